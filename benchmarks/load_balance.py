"""What skewed routing does to expert parallelism, and what capacity and redundant experts undo.

    python benchmarks/load_balance.py [--reps 3] [--quick]

With a Zipf-skewed router (`zipf:1.2`, expert e's probability scaled by (e+1)^-1.2), side by side
in one run: no balancing, capacity 1.25 with reroute, and 1, 2, 4 redundant experts planned from
the routing of a calibration run. For `tiny` at ep16 (16 ranks on 2 cores: correctness scale,
its timings are oversubscribed) and `small` at ep2 (2 ranks on 2 cores). Reports the mean and
worst load imbalance (max / mean rank load per MoE call), assignments rerouted, and the median
decode TPOT of interleaved repetitions.
"""

from __future__ import annotations

import argparse

from rich.console import Console
from rich.table import Table

try:  # `python -m benchmarks` imports this as part of the package
    from .common import interleaved, run
except ImportError:
    from common import interleaved, run
from expertmesh.config import Workload, preset
from expertmesh.deployment import Deployment
from expertmesh.parallel.placement import expert_loads
from expertmesh.engine.spec import RunSpec
from expertmesh.parallel.placement import plan_redundant

SKEW = 1.2
CAPACITY = 1.25


def compare(cfg, deployment: str, workload: Workload, reps: int) -> dict:
    dep = Deployment.parse(deployment)
    calibration = run(RunSpec(cfg, dep, workload, seed=1, record_routing=True))
    variants = {"no balancing": dict(cfg=cfg),
                f"capacity {CAPACITY} + reroute": dict(cfg=cfg.with_(capacity_factor=CAPACITY, overflow="reroute"))}
    for r in (1, 2, 4):
        placement = [plan_redundant(expert_loads(layer, cfg.n_experts), dep.ep, r) for layer in calibration.routing]
        variants[f"{r} redundant expert{'s' if r > 1 else ''}"] = dict(cfg=cfg, placement=placement)

    def measure(kw):
        kw = dict(kw)
        result = run(RunSpec(kw.pop("cfg"), dep, workload, **kw))
        rerouted = result.overflow["rerouted"] if result.overflow else 0
        return {"imbalance_mean": result.load["imbalance_mean"], "imbalance_max": result.load["imbalance_max"],
                "tpot_s": result.metrics.tpot_s, "rerouted": rerouted}

    return interleaved({name: (lambda kw=kw: measure(kw)) for name, kw in variants.items()}, reps)


def show(console: Console, title: str, medians: dict) -> None:
    base = medians["no balancing"]["tpot_s"]
    table = Table(title=title)
    for col in ("variant", "imbalance mean", "imbalance worst", "rerouted", "decode TPOT ms", "vs none"):
        table.add_column(col, justify="right")
    for name, m in medians.items():
        table.add_row(name, f"{m['imbalance_mean']:.2f}", f"{m['imbalance_max']:.2f}", f"{m['rerouted']:,.0f}",
                      f"{m['tpot_s'] * 1e3:.1f}", f"x{m['tpot_s'] / base:.2f}")
    console.print(table)


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args(argv)
    reps = 1 if args.quick else args.reps
    console = Console()
    out = {}
    cases = {
        "tiny ep16": (preset("tiny", router_skew=SKEW), "ep16",
                      Workload(batch_size=16, prompt_len=16, gen_len=4 if args.quick else 16)),
        "small ep2": (preset("small", router_skew=SKEW), "ep2",
                      Workload(batch_size=4, prompt_len=16, gen_len=4 if args.quick else 16)),
    }
    for label, (cfg, deployment, workload) in cases.items():
        out[label] = compare(cfg, deployment, workload, reps)
        show(console, f"{label} ({cfg.dtype}), zipf:{SKEW} router, batch {workload.batch_size} x prompt "
                      f"{workload.prompt_len} + {workload.gen_len}; medians of {reps}", out[label])
    console.print("imbalance: max / mean rank load per MoE call, averaged over calls and layers; decode "
                  "calls carry few tokens, so their imbalance is high even without skew", style="dim")
    return out


if __name__ == "__main__":
    main()
