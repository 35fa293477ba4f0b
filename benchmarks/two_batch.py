"""Does two-batch overlap hide the token exchange of an engine step? Measured on 2 ranks (ep2):

    python benchmarks/two_batch.py [--preset small] [--dtype fp32] [--reps 5] [--quick]

One engine forward (`engine/runner.py`, paged KV, the exchange the engine would choose) of
each case, per overlap mode, every mode once per round, medians over rounds of the slowest rank:

- none:   one batch, every exchange waited for as soon as it is issued;
- chunks: one batch, the chunked exchange overlapping expert compute (1 chunk below 1024 rows);
- tbo:    two micro-batches taking turns, one's exchange in flight while the other computes.

"exchange" is the time `none` spends waiting for exchanges (trace spans of a separate run), and
hidden = (none - mode) / exchange: the share of the exchange a mode takes off the step (it can
be negative: two half-size micro-batches cost more fixed overhead than they hide).

"exchange CPU" is what a bare `all_to_all_single` of the case's dispatch (tokens x top-k rows,
half to the peer) costs this process in CPU time (all its threads: gloo's too), as a share of
its wall time. Near 100%, the exchange is work for the same cores the compute uses, and no
ordering can hide it on a machine without an idle core: overlap then only moves that work.
"""

from __future__ import annotations

import argparse
import functools
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from expertmesh.config import Workload, preset  # noqa: E402
from expertmesh.deployment import Deployment  # noqa: E402
from expertmesh.engine.request import Request  # noqa: E402
from expertmesh.engine.runner import Runner  # noqa: E402
from expertmesh.engine.scheduler import Sequence  # noqa: E402
from expertmesh.engine.shard import load_rank  # noqa: E402
from expertmesh.engine.spec import RunSpec  # noqa: E402
from expertmesh.launch import launch  # noqa: E402
from expertmesh.parallel.expert import dispatchers  # noqa: E402
from expertmesh.trace import start_tracing, take_spans  # noqa: E402

MODES = ("none", "chunks", "tbo")
BLOCK = 16
WAITS = ("count exchange wait", "dispatch exchange wait", "combine exchange wait",
         "low-latency dispatch wait", "low-latency combine exchange wait")


def cases(quick: bool) -> list[tuple[str, int, int, int]]:
    """(name, sequences per rank, new tokens per sequence, context before them)."""
    if quick:
        return [("decode 16 x ctx 64", 16, 1, 64), ("prefill 2 x 64", 2, 64, 0)]
    return [("decode 32 x ctx 512", 32, 1, 512), ("decode 128 x ctx 256", 128, 1, 256),
            ("prefill 2 x 128", 2, 128, 0), ("prefill 2 x 256", 2, 256, 0),
            ("prefill 4 x 256", 4, 256, 0), ("prefill 8 x 512", 8, 512, 0)]


def _step(runner: Runner, n_seqs: int, new: int, context: int, vocab: int) -> list:
    """One forward's sequences: each brings `new` tokens after `context` cached positions."""
    per_seq = -(-(context + new) // BLOCK)
    seqs = []
    for i in range(n_seqs):
        tokens = [(i * 7 + t) % vocab for t in range(context + new)]
        seq = Sequence(Request(i, tokens[:max(context, 1)]), 0, tokens, computed=context,
                       blocks=list(range(i * per_seq, (i + 1) * per_seq)))
        seqs.append((seq, new))
    return seqs


def exchange_cpu_share(rows: int, d_model: int, dtype: torch.dtype, reps: int) -> float:
    """CPU time over wall time of this process for a bare exchange of `rows` rows `[rows, D]`,
    half to each of 2 ranks, median over `reps` calls."""
    x = torch.zeros(rows - rows % 2, d_model, dtype=dtype)
    y = torch.empty_like(x)
    shares = []
    for _ in range(reps + 1):
        dist.barrier()
        cpu, wall = time.process_time(), time.perf_counter()  # process_time: every thread's
        dist.all_to_all_single(y, x)
        shares.append((time.process_time() - cpu) / (time.perf_counter() - wall))
    return statistics.median(shares[1:])


def rank_main(spec: RunSpec, reps: int, quick: bool, device: torch.device) -> list[dict] | None:
    model, _, _ = load_rank(spec, device)
    cfg = spec.cfg
    held = list(dispatchers(model).values())
    out = []
    for name, n_seqs, new, context in cases(quick):
        blocks = n_seqs * -(-(context + new) // BLOCK)
        runners = {mode: Runner(model, blocks, BLOCK, overlap=mode) for mode in MODES}
        chosen = _step(runners["none"], n_seqs, new, context, cfg.vocab_size)
        sampled = [True] * n_seqs

        def forward(mode: str) -> float:
            for d in held:
                d.overlap = mode != "none"
            dist.barrier()
            t0 = time.perf_counter()
            runners[mode].forward(chosen, sampled)
            return time.perf_counter() - t0

        for mode in MODES:
            forward(mode)  # warm-up
        samples = {mode: [] for mode in MODES}
        for _ in range(reps):
            for mode in MODES:
                samples[mode].append(forward(mode))
        start_tracing()
        forward("none")
        waited = sum(s[2] for s in take_spans() if s[0] in WAITS) / 1e9
        medians = torch.tensor([statistics.median(samples[m]) for m in MODES] + [waited])
        dist.all_reduce(medians, op=dist.ReduceOp.MAX)
        cpu = exchange_cpu_share(n_seqs * new * cfg.top_k, cfg.d_model, cfg.torch_dtype, reps)
        out.append(dict(case=name, tokens=n_seqs * new, **dict(zip(MODES, medians[:3].tolist())),
                        exchange=medians[3].item(), exchange_cpu=cpu))
    return out if dist.get_rank() == 0 else None


def main(argv: list[str] | None = None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--preset", default="small")
    p.add_argument("--dtype", default="fp32")
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--quick", action="store_true", help="tiny cases, for a smoke run")
    args = p.parse_args(argv)
    cfg = preset(args.preset, dtype=args.dtype)
    spec = RunSpec(cfg, Deployment.parse("ep2"), Workload(), overlap="auto")
    spec.validate(2)
    rows = launch(functools.partial(rank_main, spec, args.reps, args.quick), 2, timeout=3600)
    print(f"ep2, {args.preset} {args.dtype}, one engine forward, medians of {args.reps} rounds (slowest rank)")
    print(f"{'case':<24}{'tokens/rank':>12}{'none ms':>10}{'chunks ms':>11}{'tbo ms':>9}"
          f"{'exchange ms':>13}{'none/tbo':>10}{'hidden chunks':>15}{'hidden tbo':>12}{'exchange CPU':>14}")
    for r in rows:
        hidden = {m: (r["none"] - r[m]) / r["exchange"] if r["exchange"] else float("nan") for m in MODES}
        print(f"{r['case']:<24}{r['tokens']:>12}{r['none'] * 1e3:>10.1f}{r['chunks'] * 1e3:>11.1f}"
              f"{r['tbo'] * 1e3:>9.1f}{r['exchange'] * 1e3:>13.1f}{r['none'] / r['tbo']:>10.2f}"
              f"{hidden['chunks']:>15.0%}{hidden['tbo']:>12.0%}{r['exchange_cpu']:>14.0%}")
    return rows


if __name__ == "__main__":
    main()
