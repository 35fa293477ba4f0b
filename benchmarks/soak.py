"""Soak run: many decode steps of one deployment, checking that resident memory stays flat on
every rank and that a rerun gives the same tokens. Not a CI test (minutes at ep16 on 2 cores).

    python benchmarks/soak.py --steps 2000 --deployment ep16 --rerun-steps 200

Each rank reads its resident set size from /proc/self/statm after step 1 (prefill done, KV cache
allocated: it is preallocated for the whole run and zero-filled, so its pages are resident from
the start) and at the last step; growth between the two would be a leak. The model's maximum
length is raised to fit the prompt plus `--steps` tokens. Prints steps/s and, for `--project`
steps, the projected time.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import time

import torch
import torch.distributed as dist

from expertmesh.config import Workload, preset
from expertmesh.deployment import Deployment
from expertmesh.engine.generate import generate
from expertmesh.engine.shard import shard_model
from expertmesh.engine.spec import RunSpec
from expertmesh.launch import launch
from expertmesh.model.synthetic import materialize
from expertmesh.parallel.mesh import stage_group
from expertmesh.parallel.pipeline import PipelineLinks

PAGE = os.sysconf("SC_PAGE_SIZE")


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * PAGE


def soak_rank(spec: RunSpec, device: torch.device) -> dict | None:
    """One rank's soak: `generate` with an RSS reading after step 1 and at the last step."""
    rank, dep = dist.get_rank(), spec.deployment
    model = materialize(shard_model(spec, rank, stage_group(dep, rank)), spec.seed,
                        spec.cfg.torch_dtype, device)
    links = PipelineLinks(dep, rank, device) if dep.pp > 1 else None
    rows = dep.rows_of(rank, spec.workload.batch_size)
    rss = {}
    last = spec.workload.gen_len - 1

    def on_step(step: int) -> None:
        if step in (1, last):
            rss[step] = rss_bytes()

    t0 = time.perf_counter()
    gen = generate(model, spec.workload, spec.workload.prompts(spec.cfg)[rows], rows,
                   spec.micro_batches, links, on_step=on_step)
    seconds = time.perf_counter() - t0
    mine = {"rank": rank, "rss": rss, "seconds": seconds,
            "rows": gen.rows if dep.reports(rank) else [], "tokens": gen.tokens}
    gathered = [None] * dist.get_world_size() if rank == 0 else None
    dist.gather_object(mine, gathered, dst=0)
    return gathered


def soak(deployment: str, steps: int, batch: int, prompt_len: int, timeout: float) -> tuple[list, torch.Tensor]:
    cfg = preset("tiny", max_seq_len=prompt_len + steps)
    dep = Deployment.parse(deployment)
    spec = RunSpec(cfg, dep, Workload(batch_size=batch, prompt_len=prompt_len, gen_len=steps, seed=1))
    spec.validate(dep.world_size)
    ranks = launch(functools.partial(soak_rank, spec), dep.world_size, timeout=timeout)
    tokens = torch.full((batch, steps), -1, dtype=torch.long)
    for r in ranks:
        if r["rows"]:
            tokens[r["rows"]] = r["tokens"]
    return ranks, tokens


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--deployment", default="ep16")
    p.add_argument("--steps", type=int, default=2000, help="decode steps of the soak run")
    p.add_argument("--rerun-steps", type=int, default=100, help="steps of the two determinism runs (0: skip)")
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--prompt-len", type=int, default=4)
    p.add_argument("--project", type=int, default=2000, help="steps to project the time of")
    p.add_argument("--timeout", type=float, default=3600.0)
    p.add_argument("--json", default=None, help="write the figures here")
    args = p.parse_args()

    t0 = time.perf_counter()
    ranks, _ = soak(args.deployment, args.steps, args.batch, args.prompt_len, args.timeout)
    wall = time.perf_counter() - t0
    slowest = max(r["seconds"] for r in ranks)
    growth = [(r["rss"][args.steps - 1] - r["rss"][1]) / 2**20 for r in ranks]
    report = {
        "deployment": args.deployment, "steps": args.steps, "batch": args.batch,
        "prompt_len": args.prompt_len, "wall_s": wall, "generate_s": slowest,
        "steps_per_s": args.steps / slowest,
        "projected_s": args.project * slowest / args.steps,
        "rss_start_mib": [r["rss"][1] / 2**20 for r in ranks],
        "rss_end_mib": [r["rss"][args.steps - 1] / 2**20 for r in ranks],
        "rss_growth_mib": growth,
    }
    print(f"{args.deployment}: {args.steps} steps in {slowest:.1f} s ({report['steps_per_s']:.2f} "
          f"steps/s; {args.project} steps would take {report['projected_s'] / 60:.1f} min); "
          f"wall {wall:.1f} s with start-up")
    for r, g in zip(ranks, growth):
        print(f"  rank {r['rank']:2d}: RSS {r['rss'][1] / 2**20:7.1f} MiB after step 1 -> "
              f"{r['rss'][args.steps - 1] / 2**20:7.1f} MiB at step {args.steps - 1} ({g:+.2f} MiB)")
    if args.rerun_steps:
        first = soak(args.deployment, args.rerun_steps, args.batch, args.prompt_len, args.timeout)[1]
        second = soak(args.deployment, args.rerun_steps, args.batch, args.prompt_len, args.timeout)[1]
        report["rerun_identical"] = bool(torch.equal(first, second))
        print(f"two runs of {args.rerun_steps} steps: tokens identical = {report['rerun_identical']}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=2)


if __name__ == "__main__":
    main()
