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
import time

import torch
import torch.distributed as dist
from rich.console import Console
from rich.table import Table

try:  # `python -m benchmarks` imports this as part of the package
    from .common import run
except ImportError:
    from common import run
from expertmesh.config import Workload, preset
from expertmesh.deployment import Deployment
from expertmesh.engine.worker import RunSpec
from expertmesh.launch import launch
from expertmesh.model.moe import GroupedExperts
from expertmesh.model.synthetic import mark_shard, materialize
from expertmesh.parallel.dispatch import AllToAllDispatcher, contiguous_placement
from expertmesh.parallel.placement import optimise_placement
from expertmesh.topology import Topology

VARIANTS = ["sync 1 chunk", "overlap 1", "overlap 2", "overlap 4", "overlap 8"]


class _NoCompute(torch.nn.Module):
    """Experts that return their input: the exchange alone."""

    def forward(self, x, counts, splits=None):
        return x


def _time(fn, reps: int) -> float:
    fn()  # warm-up
    dist.barrier()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def _layer_times(dtype_name: str, tokens: int, reps: int, rounds: int, device) -> dict[str, float]:
    cfg = preset("small", dtype=dtype_name)
    rank, ep = dist.get_rank(), dist.get_world_size()
    placement = contiguous_placement(cfg.n_experts, ep)
    experts = GroupedExperts(cfg.n_experts // ep, cfg.d_model, cfg.expert_hidden, cfg.expert_kind)
    for name, p in experts.named_parameters():
        mark_shard(experts, name, (cfg.n_experts, *p.shape[1:]), (placement[rank], slice(None), slice(None)))
    materialize(experts, seed=0, dtype=cfg.torch_dtype)
    gen = torch.Generator().manual_seed(rank)
    x = torch.randn(tokens, cfg.d_model, generator=gen).to(cfg.torch_dtype)
    ids = torch.rand(tokens, cfg.n_experts, generator=gen).argsort(dim=1)[:, :cfg.top_k]
    w = torch.rand(tokens, cfg.top_k, generator=gen).to(cfg.torch_dtype)

    def call(chunks, overlap, module=experts):
        d = AllToAllDispatcher(dist.group.WORLD, placement, cfg.n_experts, rank, chunks=chunks, overlap=overlap)
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
            samples[name].append(_time(fn, reps))
    out = torch.tensor([statistics.median(v) for v in samples.values()])
    dist.all_reduce(out, op=dist.ReduceOp.MAX)  # a layer is as slow as its slowest rank
    return dict(zip(variants, out.tolist()))


def part1(args, console: Console) -> dict:
    times = launch(functools.partial(_layer_times, args.dtype, args.tokens, args.reps, args.rounds), 2)
    sync, exchange, compute = times["sync 1 chunk"], times["exchange only"], times["compute only"]
    table = Table(title=f"ep2 MoE layer, small ({args.dtype}), {args.tokens} tokens per rank: medians "
                        f"of {args.rounds} rounds x {args.reps} calls")
    for col in ("variant", "ms per call", "vs sync", "overlap efficiency"):
        table.add_column(col, justify="right")
    for name in VARIANTS:
        t = times[name]
        eff = (sync - t) / min(exchange, compute)
        table.add_row(name, f"{t * 1e3:.1f}", f"x{t / sync:.2f}", "-" if name == VARIANTS[0] else f"{eff:.0%}")
    table.add_row("exchange only", f"{exchange * 1e3:.1f}", f"x{exchange / sync:.2f}", "")
    table.add_row("compute only", f"{compute * 1e3:.1f}", f"x{compute / sync:.2f}", "")
    console.print(table)
    return times


def part2(args, console: Console) -> dict:
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
    table = Table(title=f"ep16 as 4 nodes x 4, tiny (fp32) zipf:1.2 router, batch 16 x prompt "
                        f"{workload.prompt_len} + {workload.gen_len}: cross-node bytes per step (all ranks)")
    for col in ("exchange, placement", "KiB per step", "vs flat default"):
        table.add_column(col, justify="right")
    for name, b in results.items():
        table.add_row(name, f"{b / 1024:,.1f}", f"x{b / base:.2f}")
    console.print(table)
    console.print("placement optimised for each exchange from the routing of a calibration run with "
                  "the same prompts (an in-sample figure)", style="dim")
    return results


def measure(quick: bool = False) -> dict:
    """The figures as data, for `python -m benchmarks`: the quick sizes, or fp32 at 1024 tokens
    per rank (about 2 minutes here; the bf16 default at 2048 tokens takes far longer on CPU)."""
    return main(["--quick"] if quick else ["--dtype", "fp32", "--tokens", "1024", "--reps", "2"])


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dtype", default="bf16")
    parser.add_argument("--tokens", type=int, default=2048, help="tokens per rank in part 1")
    parser.add_argument("--reps", type=int, default=3, help="calls per measurement")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds (medians)")
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args(argv)
    if args.quick:
        args.tokens, args.reps, args.rounds = 256, 1, 1
    console = Console()
    return {"layer_seconds": part1(args, console), "cross_node_bytes_per_step": part2(args, console)}


if __name__ == "__main__":
    main()
