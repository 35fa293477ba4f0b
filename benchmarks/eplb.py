"""Online expert load balancing under a skew whose hot experts move (issue 29).

    python benchmarks/eplb.py [--steps 240] [--shift 120] [--interval 20] [--window 10] [--quick]

ep4, `tiny` preset, fp32, one spare expert slot per rank (`--redundant-experts 1`), router skew
`zipf:1.2,shift:N` (every N steps a quarter of the experts' popularity passes to the next quarter).
A batch of requests decodes for `--steps` steps, twice, side by side in one run:

  - start-up placement: the controller measures the same windows but never adopts a plan
    (margin 1.0), so both runs pay the same window reads;
  - online rebalancing: `--eplb-interval` / `--eplb-window` as given, one layer per step.

Reports the mean of the windows' measured imbalance (max / mean EP rank rows over a window, mean
over layers) of each run and their ratio (goal: at least 30% lower), and, for the rebalancing
run, each step's wall time on rank 0: the median of the steps without EPLB work against the
worst step that finished, posted or planned a move (goal: at most 1.25x), with the worst and
90th percentile of the steps without EPLB work beside it (what noise alone does to one step on a
shared CPU), and the most time a step spent on EPLB itself on any rank.
"""

from __future__ import annotations

import argparse
import functools
import json
import statistics
import sys

import torch
import torch.distributed as dist

from expertmesh.config import Workload, preset
from expertmesh.deployment import Deployment
from expertmesh.engine.engine import Engine
from expertmesh.engine.request import Request
from expertmesh.engine.scheduler import EngineConfig
from expertmesh.engine.serve import serve
from expertmesh.engine.shard import load_rank
from expertmesh.engine.spec import RunSpec
from expertmesh.engine.worker import eplb_controller
from expertmesh.launch import launch
from expertmesh.parallel.eplb import EplbConfig, run_summary
from expertmesh.parallel.eplb_plan import eplb_start

BATCH, PROMPT = 32, 8


def _rank(spec: RunSpec, steps: int, device) -> dict | None:
    """This rank serves BATCH requests of `steps` tokens; rank 0 returns the step times and every
    rank's EPLB summary."""
    torch.set_num_threads(1)
    rank = dist.get_rank()
    model, links, _ = load_rank(spec, device)
    engine_cfg = EngineConfig(block_size=16, num_blocks=BATCH * (-(-(PROMPT + steps) // 16)),
                              max_batched_tokens=BATCH * PROMPT, max_seqs=BATCH, chunked_prefill=False)
    engine = Engine(model, spec.cfg, spec.deployment, engine_cfg, rank, links,
                    eplb=eplb_controller(spec, model, rank))
    requests = [Request(i, tuple((13 * i + 7 * j) % spec.cfg.vocab_size for j in range(PROMPT)), steps)
                for i in range(BATCH)]
    transcript = serve(engine, [(0, r) for r in requests])
    summaries = [None] * dist.get_world_size()
    dist.all_gather_object(summaries, engine.eplb.summary())
    if rank != 0:
        return None
    ends = transcript.token_times[0]
    return {"step_s": [b - a for a, b in zip(ends, ends[1:])], "summaries": summaries}


def measure(steps: int, shift: int, interval: int, window: int, adopt: bool) -> dict:
    cfg = preset("tiny", router_skew=1.2, router_skew_shift=shift)
    dep = Deployment.parse("ep4")
    eplb = EplbConfig(interval, window, 1) if adopt else EplbConfig(interval, window, 1, margin=1.0)
    spec = RunSpec(cfg, dep, Workload(), placement=eplb_start(cfg, dep.ep, 1), eplb=eplb)
    spec.validate(dep.world_size)
    out = launch(functools.partial(_rank, spec, steps), dep.world_size, timeout=1800)
    summary = run_summary(out["summaries"])
    busy = set().union(*(s["busy_steps"] for s in out["summaries"]))
    # step_s[i] ends at engine step i + 1 (step 0 is the prefill)
    normal = [t for i, t in enumerate(out["step_s"]) if i + 1 not in busy]
    during = [t for i, t in enumerate(out["step_s"]) if i + 1 in busy]
    return {"window_imbalance": statistics.mean(summary["window_imbalance"]),
            "windows": summary["window_imbalance"],
            "rebalances": summary["rebalances"], "layer_switches": summary["layer_switches"],
            "median_step_s": statistics.median(normal), "p90_step_s": _p90(normal),
            "worst_step_s": max(normal), "median_busy_step_s": statistics.median(during) if during else 0.0,
            "p90_busy_step_s": _p90(during) if during else 0.0, "worst_busy_step_s": max(during, default=0.0),
            "max_step_stall_s": summary["max_step_stall_s"], "bytes_moved": summary["bytes_moved"]}


def _p90(values: list[float]) -> float:
    return sorted(values)[int(0.9 * (len(values) - 1))]


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=240)
    p.add_argument("--shift", type=int, default=120)
    p.add_argument("--interval", type=int, default=20)
    p.add_argument("--window", type=int, default=10)
    p.add_argument("--quick", action="store_true", help="40 steps, shift 20, interval 8, window 4")
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)
    if args.quick:
        args.steps, args.shift, args.interval, args.window = 40, 20, 8, 4
    static = measure(args.steps, args.shift, args.interval, args.window, adopt=False)
    online = measure(args.steps, args.shift, args.interval, args.window, adopt=True)
    result = {"static": static, "online": online,
              "imbalance_ratio": online["window_imbalance"] / static["window_imbalance"],
              "worst_busy_step_vs_median": online["worst_busy_step_s"] / online["median_step_s"],
              "p90_busy_step_vs_median": online["p90_busy_step_s"] / online["median_step_s"],
              "worst_normal_step_vs_median": online["worst_step_s"] / online["median_step_s"],
              "args": vars(args)}
    print(json.dumps(result, indent=2))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)
    return result


if __name__ == "__main__":
    sys.exit(0 if main() else 1)
