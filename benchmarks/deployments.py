"""The seed's deployments at CPU scale, without oversubscription: 2 ranks on 2 cores.

    python benchmarks/deployments.py [--dtype bf16] [--reps 3] [--quick] [--redundant-experts R]

`small` preset; one prefill-heavy and one decode-heavy workload; `single` (one process, 2
threads), `ep2`, `tp2`, `pp2` (one thread per rank); interleaved repetitions; medians of TPS,
TPOT and TTFT with ratios to `single`; and, for ep2, where the MoE layer's time goes (token
exchange vs expert compute), from a traced run.

With `--redundant-experts R`, two more rows: ep2 with R replicas of hot experts (planned from
the routing of a calibration run of the same workload), each source served by its own replica
(`ep2+R local`) and with the replicas' tokens split per layer call to even out the ranks' rows
(`ep2+R balanced`, `--replica-routing balanced`).
"""

from __future__ import annotations

import argparse
import dataclasses

from rich.console import Console
from rich.table import Table

try:  # `python -m benchmarks` imports this as part of the package
    from .common import interleaved, moe_time_shares, run
except ImportError:  # `python benchmarks/deployments.py` runs it as a script
    from common import interleaved, moe_time_shares, run
from expertmesh.config import ModelConfig, Workload, preset
from expertmesh.deployment import Deployment
from expertmesh.engine.spec import RunSpec
from expertmesh.parallel.placement import balanced_placement

DEPLOYMENTS = ("single", "ep2", "tp2", "pp2")


def workloads(quick: bool) -> dict[str, Workload]:
    if quick:
        return {"prefill-heavy": Workload(batch_size=2, prompt_len=64, gen_len=2),
                "decode-heavy": Workload(batch_size=2, prompt_len=8, gen_len=8)}
    return {"prefill-heavy": Workload(batch_size=4, prompt_len=256, gen_len=4),
            "decode-heavy": Workload(batch_size=8, prompt_len=16, gen_len=32)}


def variants(cfg: ModelConfig, workload: Workload, redundant: int) -> dict[str, RunSpec]:
    """The runs of one workload, by label: every deployment, and ep2 with `redundant` replicas."""
    out = {d: RunSpec(cfg, Deployment.parse(d), workload) for d in DEPLOYMENTS}
    if redundant:
        ep2 = Deployment.parse("ep2")
        routing = run(RunSpec(cfg, ep2, workload, record_routing=True)).routing
        placement = balanced_placement(routing, cfg, ep2.ep, redundant)
        for choice in ("local", "balanced"):
            out[f"ep2+{redundant} {choice}"] = RunSpec(cfg, ep2, workload, placement=placement,
                                                       replica_routing=choice)
    return out


def measure(dtype: str = "bf16", reps: int = 3, quick: bool = False, cfg: ModelConfig | None = None,
            loads: dict[str, Workload] | None = None, progress=None, redundant: int = 0) -> dict[str, dict]:
    """Every deployment on every workload, as data: `{label: {"workload", "medians", "ep2_shares"}}`
    where `medians[deployment]` holds decode/prefill/overall TPS, TPOT and TTFT (seconds) and
    `ep2_shares` the seconds per MoE step of one traced ep2 run. `cfg` (default: `small` in
    `dtype`) and `loads` (default: `workloads(quick)`) override the plan; `progress()` is called
    after each run."""
    cfg = cfg or preset("small", dtype=dtype)
    out = {}
    for label, workload in (loads or workloads(quick)).items():
        def measure_one(spec: RunSpec):
            result = run(spec)
            m = result.metrics
            if progress:
                progress()
            imbalance = result.load["imbalance_mean"] if result.load else 1.0  # no EP: one holder
            return {"decode_tps": m.decode_tps, "prefill_tps": m.prefill_tps,
                    "overall_tps": m.overall_tps, "tpot_s": m.tpot_s, "ttft_s": m.ttft_s,
                    "imbalance": imbalance}

        medians = interleaved({label: (lambda spec=spec: measure_one(spec))
                               for label, spec in variants(cfg, workload, redundant).items()}, reps)
        traced = run(RunSpec(cfg, Deployment.parse("ep2"), workload, trace=True))
        if progress:
            progress()
        out[label] = {"workload": dataclasses.asdict(workload), "model": cfg.name,
                      "dtype": cfg.dtype, "reps": reps, "medians": medians,
                      "ep2_shares": moe_time_shares(traced.spans)}
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dtype", default="bf16")
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--quick", action="store_true", help="tiny workloads, to check the script")
    parser.add_argument("--redundant-experts", type=int, default=0,
                        help="add ep2 with this many replicas, local and balanced replica routing")
    args = parser.parse_args()
    console = Console()
    for label, r in measure(args.dtype, args.reps, args.quick, redundant=args.redundant_experts).items():
        medians, workload = r["medians"], r["workload"]
        base = medians["single"]
        table = Table(title=f"{label}: small ({args.dtype}), batch {workload['batch_size']} x prompt "
                            f"{workload['prompt_len']} + {workload['gen_len']}; medians of {args.reps}, "
                            f"ratio to single in brackets")
        for col in ("deployment", "prefill TPS", "decode TPS", "overall TPS", "TTFT ms", "TPOT ms",
                    "EP rows max / mean"):
            table.add_column(col, justify="right")
        for dep, m in medians.items():
            def cell(key, scale=1.0, fmt="{:,.0f}"):
                return f"{fmt.format(m[key] * scale)} (x{m[key] / base[key]:.2f})"
            table.add_row(dep, cell("prefill_tps"), cell("decode_tps"), cell("overall_tps"),
                          cell("ttft_s", 1e3, "{:.1f}"), cell("tpot_s", 1e3, "{:.1f}"),
                          f"{m['imbalance']:.2f}" if dep.startswith("ep") else "-")
        console.print(table)
        shares = r["ep2_shares"]
        total = sum(shares.values())
        console.print(f"ep2 MoE layer time per rank ({label}, one traced run): " + ", ".join(
            f"{k} {v * 1e3:.0f} ms ({v / total:.0%})" for k, v in shares.items()))


if __name__ == "__main__":
    main()
