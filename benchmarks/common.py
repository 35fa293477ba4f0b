"""Shared by the benchmark scripts: run a plan (in-process for `single`, else local ranks),
interleave repetitions so that machine noise hits every variant alike, and take medians."""

from __future__ import annotations

import os
import statistics
import time
from collections.abc import Callable

import torch
import torch.distributed as dist

from expertmesh.engine import worker
from expertmesh.engine.result import RunResult
from expertmesh.engine.spec import RunSpec
from expertmesh.model.moe import GroupedExperts
from expertmesh.model.synthetic import mark_shard, materialize
from expertmesh.parallel.placement import contiguous_placement


def run(spec: RunSpec) -> RunResult:
    if spec.deployment.world_size == 1:
        # the single process may use every core the ranks of the other deployments share
        torch.set_num_threads(min(os.cpu_count() or 1, 2))
    return worker.run(spec, timeout=1800)


def interleaved(variants: dict[str, Callable[[], dict]], reps: int) -> dict[str, dict[str, float]]:
    """Run each variant once per round, `reps` rounds; the median of every reported number."""
    samples: dict[str, list[dict]] = {name: [] for name in variants}
    for _ in range(reps):
        for name, fn in variants.items():
            samples[name].append(fn())
    return {name: {key: statistics.median(s[key] for s in runs if s[key] is not None)
                   for key in runs[0]} for name, runs in samples.items()}


def median_seconds(fn: Callable[[], object], reps: int) -> float:
    """One warm-up call, a barrier so that every rank starts together, then the median wall time
    of `reps` calls of `fn`."""
    fn()
    dist.barrier()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def moe_time_shares(spans: dict[int, list]) -> dict[str, float]:
    """Seconds the ranks spent in the MoE layers' steps (means over ranks), from trace spans."""
    steps = {"route": ("route",), "count exchange": ("count exchange wait",),
             "exchange wait": ("dispatch exchange wait", "combine exchange wait", "relay exchange",
                               "relay return", "low-latency dispatch wait",
                               "low-latency combine exchange wait"),
             "expert compute": ("expert compute",), "combine": ("combine",)}
    out = {}
    for step, names in steps.items():
        per_rank = [sum(s[2] for s in rank_spans if s[0] in names) for rank_spans in spans.values()]
        out[step] = statistics.mean(per_rank) / 1e9
    return out


def rank_experts(cfg, rank: int, ep: int) -> tuple[list[list[int]], GroupedExperts]:
    """This EP rank's experts of one MoE layer of `cfg` under the contiguous placement, with
    synthetic weights (seed 0): (placement, experts)."""
    placement = contiguous_placement(cfg.n_experts, ep)
    experts = GroupedExperts(cfg.n_experts // ep, cfg.d_model, cfg.expert_hidden, cfg.expert_kind)
    for name, p in experts.named_parameters():
        mark_shard(experts, name, (cfg.n_experts, *p.shape[1:]), (placement[rank], slice(None), slice(None)))
    return placement, materialize(experts, seed=0, dtype=cfg.torch_dtype)
