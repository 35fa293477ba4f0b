"""The result of a run as rank 0 assembles it: every rank sends its `RankReport`, rank 0 adds the
engine's transcript and makes one `RunResult` (tokens, metrics, bytes per rank, the counters'
summaries).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from expertmesh.engine import counters
from expertmesh.engine.counters import RankCounters
from expertmesh.engine.metrics import Metrics
from expertmesh.engine.scheduler import SchedulerStats
from expertmesh.engine.serve import Transcript
from expertmesh.engine.spec import RunSpec
from expertmesh.parallel.eplb import run_summary


@dataclass
class RankReport:
    """What one rank sends rank 0 after a run."""

    rank: int
    param_bytes: int
    kv_cache_bytes: int
    checkpoint_bytes: int
    counters: RankCounters
    spans: list | None = None
    eplb: dict | None = None  # the online EPLB controller's summary (`parallel/eplb.py`)


@dataclass
class RunResult:
    """The whole run as rank 0 sees it. tokens `[B, gen_len]`; logits `[B, gen_len, V]` if recorded."""

    deployment: str
    world_size: int
    tokens: torch.Tensor
    metrics: Metrics
    param_bytes: list[int]
    kv_cache_bytes: list[int]
    logits: torch.Tensor | None = None
    exchange: dict | None = None
    routing: list | None = None
    load: dict | None = None
    overflow: dict | None = None
    spans: dict[int, list] | None = None
    checkpoint_bytes: list[int] | None = None
    eplb: dict | None = None
    prompt_tokens: dict | None = None

    def to_dict(self) -> dict:
        return {
            "deployment": self.deployment, "world_size": self.world_size,
            "metrics": self.metrics.to_dict(), "param_bytes_per_rank": self.param_bytes,
            "kv_cache_bytes_per_rank": self.kv_cache_bytes, "exchange": self.exchange,
            "load": self.load, "overflow": self.overflow, "prompt_tokens": self.prompt_tokens,
            "tokens": self.tokens.tolist(),
            **({"eplb": self.eplb} if self.eplb is not None else {}),
        }


def assemble(spec: RunSpec, transcript: Transcript, reports: list[RankReport]) -> RunResult:
    """The batch's tokens `[B, gen_len]` (and logits) from the engine's transcript, its metrics
    from the step times (every sequence gets token i at step i), and the ranks' reports."""
    workload, dep = spec.workload, spec.deployment
    batch, gen_len = workload.batch_size, workload.gen_len
    if transcript.rejected:
        raise ValueError(next(iter(transcript.rejected.values())))
    if any(len(transcript.tokens[i]) != gen_len for i in range(batch)):
        raise RuntimeError("some sequences did not produce every token")
    tokens = torch.tensor([transcript.tokens[i] for i in range(batch)], dtype=torch.long)
    logits = None
    if spec.record_logits:
        logits = torch.stack([torch.stack(transcript.logits[i]) for i in range(batch)])
    ranks = [r.counters for r in reports]
    exchange = load = routing = None
    if dep.ep > 1:
        topology = spec.topology
        exchange = {"a2a": spec.a2a, "nodes": topology.nodes, "gpus_per_node": topology.gpus_per_node,
                    **counters.exchange_summary(ranks, steps=gen_len)}
        load = counters.load(ranks, dep, spec.cfg.n_experts)
        if spec.record_routing:
            routing = counters.routing_by_rank(ranks, dep, spec.cfg.n_layers)
    return RunResult(
        deployment=dep.name, world_size=dep.world_size, tokens=tokens,
        metrics=Metrics.from_events(0.0, transcript.token_times[0], batch, workload.prompt_len),
        param_bytes=[r.param_bytes for r in reports],
        kv_cache_bytes=[r.kv_cache_bytes for r in reports], logits=logits,
        exchange=exchange, routing=routing, load=load,
        overflow=counters.overflow_total(ranks, dep) if spec.cfg.capacity is not None else None,
        spans={r.rank: r.spans for r in reports} if spec.trace else None,
        checkpoint_bytes=[r.checkpoint_bytes for r in reports] if spec.checkpoint else None,
        eplb=run_summary([r.eplb for r in reports]) if spec.eplb is not None else None,
        prompt_tokens=prompt_tokens(transcript.rank_stats, dep),
    )


def prompt_tokens(rank_stats: list[SchedulerStats], dep) -> dict:
    """Prompt tokens over the data-parallel ranks (each counted once, by its reporting rank):
    all of them, those found in the prefix cache, and those computed (recomputation after a
    preemption included)."""
    mine = [s for rank, s in enumerate(rank_stats) if dep.reports(rank)]
    return {"total": sum(s.prompt_tokens for s in mine), "cached": sum(s.cached_tokens for s in mine),
            "computed": sum(s.prompt_computed for s in mine)}
