"""One run of a plan on one rank, and the result rank 0 assembles from all ranks.

A plan (`RunSpec`) is a ModelConfig + Deployment + Workload + seed. Each rank builds the model on
the meta device, applies the deployment's parallelism to it, materializes only its own shard,
warms up, runs `generate`, and sends what it produced to rank 0 (`gather_object`).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

import torch
import torch.distributed as dist

from expertmesh.config import ModelConfig, Workload
from expertmesh.deployment import Deployment
from expertmesh.engine.generate import Generation, generate
from expertmesh.engine.metrics import Metrics, merge_step_times
from expertmesh.model.synthetic import materialize
from expertmesh.model.transformer import MoETransformer, build_model, parameter_bytes
from expertmesh.parallel.dispatch import contiguous_placement
from expertmesh.parallel.expert import apply_expert_parallel
from expertmesh.parallel.mesh import stage_group
from expertmesh.parallel.pipeline import PipelineLinks, apply_pipeline
from expertmesh.parallel.tensor import apply_tensor_parallel

WARMUP_PROMPT, WARMUP_GEN = 8, 2


@dataclass(frozen=True)
class RunSpec:
    """Everything a rank needs to run its part of a plan. `n_micro=None`: one per pipeline stage."""

    cfg: ModelConfig
    deployment: Deployment
    workload: Workload
    seed: int = 0
    n_micro: int | None = None
    record_logits: bool = False
    warmup: bool = True

    def validate(self, world_size: int | None = None) -> None:
        """All checks that can fail, before any rank starts."""
        self.deployment.validate(self.cfg, world_size)
        self.workload.validate_for(self.cfg)
        if self.n_micro is not None and self.n_micro < 1:
            raise ValueError(f"micro-batches {self.n_micro} must be at least 1")

    @property
    def micro_batches(self) -> int:
        return self.n_micro or self.deployment.pp


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
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        return {
            "deployment": self.deployment, "world_size": self.world_size,
            "metrics": self.metrics.to_dict(), "param_bytes_per_rank": self.param_bytes,
            "kv_cache_bytes_per_rank": self.kv_cache_bytes, "tokens": self.tokens.tolist(),
            "notes": self.notes,
        }


def shard_model(spec: RunSpec, rank: int, group: dist.ProcessGroup | None) -> MoETransformer:
    """This rank's shard of the model, still on the meta device."""
    dep = spec.deployment
    model = build_model(spec.cfg)
    stage, inner = dep.coords(rank)
    if dep.pp > 1:
        apply_pipeline(model, dep, stage)
    if dep.tp > 1:
        apply_tensor_parallel(model, group, dep.tp, inner)
    if dep.ep > 1:
        apply_expert_parallel(model, group, inner, contiguous_placement(spec.cfg.n_experts, dep.ep))
    return model


def run_rank(spec: RunSpec, device: torch.device, on_step=None) -> RunResult | None:
    """Run `spec` as this rank of the default process group; rank 0 returns the result."""
    rank = dist.get_rank() if dist.is_initialized() else 0
    dep = spec.deployment
    group = stage_group(dep, rank) if dist.is_initialized() else None
    model = materialize(shard_model(spec, rank, group), spec.seed, spec.cfg.torch_dtype, device)
    links = PipelineLinks(dep, rank, device) if dep.pp > 1 else None
    rows = dep.rows_of(rank, spec.workload.batch_size)
    prompts = spec.workload.prompts(spec.cfg)[rows]

    if spec.warmup:
        warm = dataclasses.replace(spec.workload, prompt_ids=None, gen_len=min(WARMUP_GEN, spec.workload.gen_len),
                                   prompt_len=min(WARMUP_PROMPT, spec.workload.prompt_len))
        generate(model, warm, warm.prompts(spec.cfg)[rows], rows, spec.micro_batches, links)
    if dist.is_initialized():
        dist.barrier()
    gen = generate(model, spec.workload, prompts, rows, spec.micro_batches, links,
                   record_logits=spec.record_logits, on_step=on_step if rank == 0 else None)
    payload = {
        "rank": rank, "reports": dep.reports(rank), "gen": gen,
        "param_bytes": parameter_bytes(model, spec.cfg.torch_dtype),
    }
    if not dist.is_initialized():
        return assemble(spec, [payload])
    gathered = [None] * dist.get_world_size() if rank == 0 else None
    dist.gather_object(payload, gathered, dst=0)
    return assemble(spec, gathered) if rank == 0 else None


def assemble(spec: RunSpec, payloads: list[dict]) -> RunResult:
    """Put the ranks' sequences back in global order and merge their event logs."""
    B, G = spec.workload.batch_size, spec.workload.gen_len
    tokens = torch.full((B, G), -1, dtype=torch.long)
    logits = None
    reporting: list[Generation] = [p["gen"] for p in payloads if p["reports"]]
    for gen in reporting:
        tokens[gen.rows] = gen.tokens
        if gen.logits is not None:
            if logits is None:
                logits = torch.zeros(B, G, gen.logits.shape[-1])
            logits[gen.rows] = gen.logits
    if (tokens < 0).any():
        raise RuntimeError("some sequences were reported by no rank")
    start, step_times = merge_step_times([(g.start, g.step_times) for g in reporting if g.rows])
    return RunResult(
        deployment=spec.deployment.name, world_size=spec.deployment.world_size, tokens=tokens,
        metrics=Metrics.from_events(start, step_times, B, spec.workload.prompt_len),
        param_bytes=[p["param_bytes"] for p in payloads],
        kv_cache_bytes=[p["gen"].kv_cache_bytes for p in payloads], logits=logits,
    )

