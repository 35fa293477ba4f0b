"""Does the overlapped token exchange hide behind expert compute, and what crosses node boundaries?

    python benchmarks/overlap.py [--dtype bf16] [--tokens 2048] [--reps 5] [--quick]

Part 1, 2 ranks (2 cores, no oversubscription), `small` preset's MoE layer: one dispatcher call
on `--tokens` tokens per rank, synchronous (every exchange waited at once) against overlapped
with 1, 2, 4 and 8 chunks; interleaved repetitions, medians. Overlap efficiency = time saved /
min(exchange time, compute time), where exchange time is the same call with experts that do no
work and compute time is the experts alone on the rows this rank receives.
Part 2, 16 ranks as 4 nodes x 4, `tiny` with a Zipf-skewed router: cross-node bytes per step
for flat vs hierarchical exchange, with the default and the optimised placement (optimised from
routing recorded in the first run).
"""

from __future__ import annotations

import argparse
import functools
import statistics
import sys

import torch
import torch.distributed as dist
from rich.console import Console
from rich.table import Table

try:  # `python -m benchmarks` imports this as part of the package
    from .common import median_seconds, rank_experts, run
except ImportError:
    from common import median_seconds, rank_experts, run
from expertmesh.config import Workload, preset
from expertmesh.deployment import Deployment
from expertmesh.engine.spec import RunSpec
from expertmesh.launch import launch
from expertmesh.parallel.dispatch import AllToAllDispatcher
from expertmesh.parallel.placement import contiguous_placement
from expertmesh.parallel.placement import optimise_placement
from expertmesh.topology import Topology

VARIANTS = ["sync 1 chunk", "overlap 1", "overlap 2", "overlap 4", "overlap 8"]


class _NoCompute(torch.nn.Module):
    """Experts that return their input: the exchange alone."""

    def forward(self, x, counts, splits=None):
        return x


def _layer_times(preset_name: str, dtype_name: str, tokens: int, reps: int, rounds: int,
                 device) -> dict[str, float]:
    cfg = preset(preset_name, dtype=dtype_name)
    rank, ep = dist.get_rank(), dist.get_world_size()
    placement, experts = rank_experts(cfg, rank, ep)
    gen = torch.Generator().manual_seed(rank)
    x = torch.randn(tokens, cfg.d_model, generator=gen).to(cfg.torch_dtype)
    ids = torch.rand(tokens, cfg.n_experts, generator=gen).argsort(dim=1)[:, :cfg.top_k]
    w = torch.rand(tokens, cfg.top_k, generator=gen).to(cfg.torch_dtype)

    def call(chunks, overlap, module=experts):
        d = AllToAllDispatcher(dist.group.WORLD, placement, cfg.n_experts, rank, chunks=chunks, overlap_chunks=overlap)
        return lambda: d(x, ids, w, module)

    variants = {"sync 1 chunk": call(1, False), "overlap 1": call(1, True), "overlap 2": call(2, True),
                "overlap 4": call(4, True), "overlap 8": call(8, True),
                "exchange only": call(1, False, _NoCompute())}
    received = tokens * cfg.top_k  # balanced random routing: about what each rank receives
    rows = x.repeat(cfg.top_k, 1)[:received]
    counts = torch.full((experts.n_experts,), received // experts.n_experts)
    counts[-1] += received - int(counts.sum())
    variants["compute only"] = lambda: experts(rows, counts)
    samples = {name: [] for name in variants}
    for _ in range(rounds):  # interleaved: noise hits every variant alike
        for name, fn in variants.items():
            samples[name].append(median_seconds(fn, reps))
    out = torch.tensor([statistics.median(v) for v in samples.values()])
    dist.all_reduce(out, op=dist.ReduceOp.MAX)  # a layer is as slow as its slowest rank
    return dict(zip(variants, out.tolist()))


def layer_rows(times: dict[str, float]) -> list[dict]:
    """Part 1's medians as rows: ms per call, ratio to the synchronous call, overlap efficiency
    (time saved / min(exchange alone, compute alone); None where it does not apply)."""
    sync, exchange, compute = times["sync 1 chunk"], times["exchange only"], times["compute only"]
    return [{"variant": name, "ms": times[name] * 1e3, "vs_sync": times[name] / sync,
             "efficiency": (sync - times[name]) / min(exchange, compute)
             if name in VARIANTS[1:] else None}
            for name in [*VARIANTS, "exchange only", "compute only"]]


def part1(args) -> tuple[str, list[dict]]:
    times = launch(functools.partial(_layer_times, args.preset, args.dtype, args.tokens, args.reps,
                                     args.rounds), 2)
    title = (f"ep2 MoE layer, {args.preset} ({args.dtype}), {args.tokens} tokens per rank: medians of "
             f"{args.rounds} rounds x {args.reps} calls")
    return title, layer_rows(times)


def part2(args) -> tuple[str, list[dict]]:
    cfg = preset("tiny", router_skew=1.2)
    dep = Deployment.parse("ep16")
    workload = Workload(batch_size=16, prompt_len=8 if args.quick else 32, gen_len=4 if args.quick else 8)

    def spec(**kw):
        return RunSpec(cfg, dep, workload, gpus_per_node=4, **kw)

    calibration = run(spec(record_routing=True))
    topology = Topology(nodes=4, gpus_per_node=4)
    results = {}
    for a2a in ("flat", "hierarchical"):
        start = contiguous_placement(cfg.n_experts, 16)
        optimised = [optimise_placement(start, layer, topology, a2a == "hierarchical")
                     for layer in calibration.routing]
        for label, placement in (("default", None), ("optimised", optimised)):
            result = run(spec(a2a=a2a, placement=placement))
            results[f"{a2a}, {label} placement"] = result.exchange["cross_node_bytes_per_step"]
    base = results["flat, default placement"]
    title = (f"ep16 as 4 nodes x 4, tiny (fp32) zipf:1.2 router, batch 16 x prompt "
             f"{workload.prompt_len} + {workload.gen_len}: cross-node bytes per step (all ranks)")
    return title, [{"exchange": name, "kib_per_step": b / 1024, "vs_flat": b / base} for name, b in results.items()]


LAYER_COLUMNS = [("variant", "variant", "{}"), ("ms", "ms per call", "{:.1f}"),
                 ("vs_sync", "vs sync", "x{:.2f}"), ("efficiency", "overlap efficiency", "{:.0%}")]
CROSS_NODE_COLUMNS = [("exchange", "exchange, placement", "{}"), ("kib_per_step", "KiB per step", "{:,.1f}"),
                      ("vs_flat", "vs flat default", "x{:.2f}")]
CROSS_NODE_NOTE = ("placement optimised for each exchange from the routing of a calibration run with "
                   "the same prompts (an in-sample figure)")


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="small", help="model of part 1's MoE layer")
    parser.add_argument("--dtype", default="bf16")
    parser.add_argument("--tokens", type=int, default=2048, help="tokens per rank in part 1")
    parser.add_argument("--reps", type=int, default=3, help="calls per measurement")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds (medians)")
    parser.add_argument("--quick", action="store_true", help="1 round of 1 call, shorter part 2")
    args = parser.parse_args(argv)
    if args.quick:
        args.reps, args.rounds = 1, 1
    return args


def _print(console: Console, title: str, rows: list[dict], columns) -> None:
    table = Table(title=title)
    for _, header, _ in columns:
        table.add_column(header, justify="right")
    for row in rows:
        table.add_row(*["-" if row[key] is None else fmt.format(row[key]) for key, _, fmt in columns])
    console.print(table)


def main(argv=None) -> dict:
    args = parse_args(argv if argv is not None else sys.argv[1:])
    console = Console()
    layer, cross = part1(args), part2(args)
    _print(console, *layer, LAYER_COLUMNS)
    _print(console, *cross, CROSS_NODE_COLUMNS)
    console.print(CROSS_NODE_NOTE, style="dim")
    return {"layer": layer[1], "cross_node": cross[1]}


if __name__ == "__main__":
    main()
