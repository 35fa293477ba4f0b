"""Host ms of an engine decode step outside the model's forward, this tree against an earlier
revision, side by side in one run (issue 24, item 5: goal under 1.5 ms at 128 sequences x 10k):

    python benchmarks/host_step.py [--before f6f6b9f] [--batch 128] [--context 10000] [--reps 5]

Each variant is a fresh process on one torch thread: the tree it imports (this one, or
`--before` exported with `git archive`), one `Engine` on the CPU (deployment single, eager,
greedy) whose `batch` sequences are made to hold `context` positions without a prefill (the
scheduler's state is set directly: blocks taken from the pool, `context - 1` tokens computed; the
KV pool holds zeros, which changes no host work), two warm-up steps, then `steps` decode steps.
Host ms of a step: its wall ms less the wall ms of `forward_paged` (as `expertmesh profile`'s
`host_ms_per_step`), and the same in CPU ms of the engine's thread (`time.thread_time`), which
other processes on a shared machine disturb less than the wall clock; on the CPU this includes the device work that runs outside the forward
(sampling's argmax, the plan's layout ops), which CUDA would run asynchronously.

The model is the `tiny` preset cut down so that the forward of 128 x 10k stays near 0.1 s on
one core: 1 layer, d_model 64, 2 heads (and KV heads) of 32, 4 experts of hidden 64, vocabulary
1024, max_seq_len 16384. Host work depends on the batch, the context and the vocabulary (the
sampling rows), not on these widths. Variants alternate, `reps` rounds; prints the medians over
rounds of each round's median step, and the ratio.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def measure(batch: int, context: int, steps: int) -> dict:
    """In the child process: median host ms per decode step (and forward ms) of the tree imported."""
    import torch

    torch.set_num_threads(1)
    from expertmesh.config import Workload, preset
    from expertmesh.deployment import Deployment
    from expertmesh.engine.engine import Engine
    from expertmesh.engine.request import Request
    from expertmesh.engine.scheduler import EngineConfig
    from expertmesh.engine.shard import load_rank
    from expertmesh.engine.spec import RunSpec

    cfg = preset("tiny", max_seq_len=16384, n_layers=1, d_model=64, n_heads=2, head_dim=32,
                 expert_hidden=64, n_experts=4)
    spec = RunSpec(cfg, Deployment.parse("single"), Workload(batch_size=batch), seed=0, overlap="none")
    model, links, _ = load_rank(spec, torch.device("cpu"))
    block, longest = 16, context + steps + 8
    engine_cfg = EngineConfig(block_size=block, num_blocks=batch * -(-longest // block) + 1,
                              max_batched_tokens=batch * longest, max_seqs=batch, chunked_prefill=False)
    eng = Engine(model, cfg, spec.deployment, engine_cfg, 0, links, overlap="none", graphs="off")
    sched = eng.scheduler
    for i in range(batch):
        sched.add(Request(i, tuple((7 * i + 3 * j) % (cfg.vocab_size - 1) + 1 for j in range(context)),
                          steps + 8))
    for seq in list(sched.waiting):  # admitted as if prefilled: the last prompt token still to compute
        seq.blocks, seq.computed, seq.cached = sched.pool.allocate(sched.blocks_for(context)), context - 1, 0
        sched.running.append(seq)
    sched.waiting.clear()
    eng.dp_stats = [sched.stats()]
    for _ in range(2):
        eng.step()
    forward, forward_cpu = _timed(model, time.perf_counter), _timed(model, time.thread_time)
    host, fwd, host_cpu = [], [], []
    for _ in range(steps):
        start, cpu = time.perf_counter(), time.thread_time()
        eng.step()
        host_cpu.append(time.thread_time() - cpu - forward_cpu[-1])
        host.append(time.perf_counter() - start - forward[-1])
        fwd.append(forward[-1])
    assert len(sched.running) == batch, "every sequence decoded every step"
    import expertmesh

    return {"imported": str(Path(expertmesh.__file__).resolve().parents[1]),
            "host_cpu_ms": 1e3 * statistics.median(host_cpu), "host_ms": 1e3 * statistics.median(host),
            "forward_ms": 1e3 * statistics.median(fwd)}


def _timed(model, clock) -> list[float]:
    """Wrap `model.forward_paged` so that each call appends its `clock` seconds to the list
    returned (the benchmark's own timer, not the tree's: both trees are measured alike)."""
    spent: list[float] = []
    inner = model.forward_paged

    def timed(*args, **kwargs):
        start = clock()
        try:
            return inner(*args, **kwargs)
        finally:
            spent.append(clock() - start)

    model.forward_paged = timed
    return spent


def _export(rev: str, into: str) -> str:
    """`rev`'s `expertmesh/` package under `into`; returns the directory to import it from."""
    archive = subprocess.run(["git", "-C", str(ROOT), "archive", rev, "expertmesh"], check=True,
                             capture_output=True).stdout
    path = Path(into) / "tree.tar"
    path.write_bytes(archive)
    with tarfile.open(path) as tar:
        tar.extractall(into, filter="data")
    return into


def _child(tree: str, batch: int, context: int, steps: int) -> dict:
    env = {**os.environ, "PYTHONPATH": tree, "OMP_NUM_THREADS": "1"}
    out = subprocess.run([sys.executable, __file__, "--child", str(batch), str(context), str(steps)],
                         env=env, check=True, capture_output=True, text=True, cwd=tree).stdout
    got = json.loads(out.strip().splitlines()[-1])
    assert Path(got.pop("imported")) == Path(tree).resolve(), f"the child imported {got}, not {tree}"
    return got


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--before", default="f6f6b9f", help="the revision to compare with (default f6f6b9f, "
                   "before issue 24 item 5's host work)")
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--context", type=int, default=10_000)
    p.add_argument("--steps", type=int, default=20, help="decode steps measured per process")
    p.add_argument("--reps", type=int, default=5, help="rounds, each variant once per round")
    p.add_argument("--json", default=None)
    p.add_argument("--child", nargs=3, type=int, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        print(json.dumps(measure(*args.child)))
        return
    with tempfile.TemporaryDirectory() as tmp:
        trees = {f"before ({args.before})": _export(args.before, tmp), "after (this tree)": str(ROOT)}
        runs: dict[str, list[dict]] = {name: [] for name in trees}
        for _ in range(args.reps):
            for name, tree in trees.items():
                runs[name].append(_child(tree, args.batch, args.context, args.steps))
    rows = {name: {key: statistics.median(r[key] for r in got) for key in got[0]} for name, got in runs.items()}
    before, after = rows.values()
    print(f"{args.batch} sequences x {args.context} context, decode steps, host ms outside the forward "
          f"(median of {args.reps} rounds x {args.steps} steps), load {os.getloadavg()[0]:.2f}:")
    for name, row in rows.items():
        print(f"  {name:24s} host {row['host_ms']:6.2f} ms/step wall, {row['host_cpu_ms']:6.2f} ms/step CPU   "
              f"forward {row['forward_ms']:7.1f} ms/step")
    print(f"  ratio before/after: {before['host_ms'] / after['host_ms']:.2f}x wall, "
          f"{before['host_cpu_ms'] / after['host_cpu_ms']:.2f}x CPU (goal: after < 1.5 ms)")
    if args.json:
        Path(args.json).write_text(json.dumps({"batch": args.batch, "context": args.context, "rows": rows,
                                               "ratio": before["host_ms"] / after["host_ms"]}, indent=1))


if __name__ == "__main__":
    main()
