"""Soak run: many decode steps of one deployment through the serving engine, checking that
resident memory stays flat on every rank and that a rerun gives the same tokens. Not a CI test
(minutes at ep16 on 2 cores).

    python benchmarks/soak.py --steps 2000 --deployment ep16 --rerun-steps 200

The batch is one arrival of B requests of `--steps` tokens each (`engine/worker.py`'s static
batch). Each rank reads its resident set size from /proc/self/statm after engine step 1 (prefill
done; the KV block pool is allocated for the whole run when the engine starts, zero-filled, so its
pages are resident from the start) and at the last step; growth between the two would be a leak.
The model's maximum length is raised to fit the prompt plus `--steps` tokens. Prints steps/s and,
for `--project` steps, the projected time.
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
from expertmesh.engine.engine import Engine
from expertmesh.engine.serve import serve
from expertmesh.engine.shard import load_rank
from expertmesh.engine.spec import RunSpec
from expertmesh.engine.worker import static_engine, static_requests
from expertmesh.launch import launch

PAGE = os.sysconf("SC_PAGE_SIZE")


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * PAGE


def soak_rank(spec: RunSpec, device: torch.device) -> tuple[list[dict], torch.Tensor] | None:
    """One rank's soak: the static batch through the engine, with an RSS reading after step 1
    and at the last step. Rank 0 returns every rank's readings and the tokens `[B, gen_len]`."""
    rank, dep, w = dist.get_rank(), spec.deployment, spec.workload
    model, links, _ = load_rank(spec, device)
    requests = static_requests(w, spec.cfg)
    engine = Engine(model, spec.cfg, dep, static_engine(requests, dep), rank, links, n_micro=spec.micro_batches)
    rss, steps, last = {}, 0, w.gen_len - 1
    engine_step = engine.step

    def step_and_read_rss():  # every rank steps the engine (rank 0 in `serve`, the others in `follow`)
        nonlocal steps
        outputs = engine_step()
        if steps in (1, last):
            rss[steps] = rss_bytes()
        steps += 1
        return outputs

    engine.step = step_and_read_rss
    t0 = time.perf_counter()
    transcript = serve(engine, [(0, r) for r in requests])
    mine = {"rank": rank, "rss": rss, "seconds": time.perf_counter() - t0}
    gathered = [None] * dist.get_world_size() if rank == 0 else None
    dist.gather_object(mine, gathered, dst=0)
    if rank != 0:
        return None
    return gathered, torch.tensor([transcript.tokens[i] for i in range(w.batch_size)])


def soak(deployment: str, steps: int, batch: int, prompt_len: int, timeout: float) -> tuple[list, torch.Tensor]:
    cfg = preset("tiny", max_seq_len=prompt_len + steps)
    dep = Deployment.parse(deployment)
    spec = RunSpec(cfg, dep, Workload(batch_size=batch, prompt_len=prompt_len, gen_len=steps, seed=1))
    spec.validate(dep.world_size)
    return launch(functools.partial(soak_rank, spec), dep.world_size, timeout=timeout)


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
