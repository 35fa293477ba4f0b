"""When does the low-latency exchange beat the standard one? An EP=2 MoE layer per call.

    python benchmarks/low_latency.py [--dtype fp32] [--tokens 1,4,16,64,256] [--reps 20] [--rounds 5]

2 ranks, one thread each (2 cores, no oversubscription), the `small` preset's MoE layer, random
top-2 routing, the same tokens on both paths: the standard exchange (a count exchange, then
dispatch and return with splits read on the host, one chunk) against the low-latency one (one
fixed-size message per direction, counts inside), per tokens-per-rank. Interleaved rounds,
medians, the slower rank's time (a layer is as slow as its slowest rank). The crossover sets
`LOW_LATENCY_TOKENS` in `parallel/dispatch.py`.
"""

from __future__ import annotations

import argparse
import functools
import statistics

import torch
import torch.distributed as dist
from rich.console import Console
from rich.table import Table

try:  # `python -m benchmarks` imports this as part of the package
    from .common import median_seconds, rank_experts
except ImportError:
    from common import median_seconds, rank_experts
from expertmesh.config import preset
from expertmesh.launch import launch
from expertmesh.parallel.dispatch import AllToAllDispatcher


def _layer_times(dtype_name: str, token_counts: list[int], reps: int, rounds: int, device) -> dict:
    cfg = preset("small", dtype=dtype_name)
    rank, ep = dist.get_rank(), dist.get_world_size()
    placement, experts = rank_experts(cfg, rank, ep)
    gen = torch.Generator().manual_seed(rank)
    samples = {(t, path): [] for t in token_counts for path in ("standard", "low-latency")}
    calls = {}
    for tokens in token_counts:
        x = torch.randn(tokens, cfg.d_model, generator=gen).to(cfg.torch_dtype)
        ids = torch.rand(tokens, cfg.n_experts, generator=gen).argsort(dim=1)[:, :cfg.top_k]
        w = torch.rand(tokens, cfg.top_k, generator=gen).to(cfg.torch_dtype)
        for path in ("standard", "low-latency"):
            d = AllToAllDispatcher(dist.group.WORLD, placement, cfg.n_experts, rank, chunks=1)
            bound = tokens if path == "low-latency" else None
            calls[tokens, path] = functools.partial(d, x, ids, w, experts, bound)
    for _ in range(rounds):  # interleaved: noise hits every variant alike
        for key, call in calls.items():
            samples[key].append(median_seconds(call, reps))  # after a warm-up of this variant
    medians = torch.tensor([statistics.median(v) for v in samples.values()])
    dist.all_reduce(medians, op=dist.ReduceOp.MAX)
    return dict(zip(samples, medians.tolist()))


def measure(dtype: str = "fp32", token_counts=(1, 4, 16, 64, 256), reps: int = 20, rounds: int = 5) -> list[dict]:
    times = launch(functools.partial(_layer_times, dtype, list(token_counts), reps, rounds), 2)
    return [{"tokens": t, "standard_ms": times[t, "standard"] * 1e3,
             "low_latency_ms": times[t, "low-latency"] * 1e3,
             "ratio": times[t, "standard"] / times[t, "low-latency"]} for t in token_counts]


def main(argv=None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dtype", default="fp32")
    parser.add_argument("--tokens", default="1,4,16,64,256", help="tokens per rank, comma-separated")
    parser.add_argument("--reps", type=int, default=20, help="calls per measurement")
    parser.add_argument("--rounds", type=int, default=5, help="interleaved rounds (medians)")
    args = parser.parse_args(argv)
    rows = measure(args.dtype, [int(t) for t in args.tokens.split(",")], args.reps, args.rounds)
    table = Table(title=f"ep2 MoE layer, small ({args.dtype}): ms per call, medians of {args.rounds} "
                        f"rounds x {args.reps} calls, slower rank")
    for name in ("tokens per rank", "standard", "low-latency", "standard / low-latency"):
        table.add_column(name, justify="right")
    for r in rows:
        table.add_row(str(r["tokens"]), f"{r['standard_ms']:.2f}", f"{r['low_latency_ms']:.2f}",
                      f"x{r['ratio']:.2f}")
    Console().print(table)
    return rows


if __name__ == "__main__":
    main()
