"""Memory one rank needs: its weights and its KV cache, by parameter arithmetic (no model built).

Counts follow the engine's sharding: attention projections split by heads under TP, experts
split by hidden units under TP and by expert under EP, layers split by stage under PP; the
embedding lives on the first stage, the final norm and LM head on the last. Activations and
framework workspace are not counted.
"""

from __future__ import annotations

from dataclasses import dataclass

from expertmesh.config import ModelConfig, Workload
from expertmesh.deployment import Deployment

ITEMSIZE = {"bf16": 2, "fp32": 4}


def layer_params(cfg: ModelConfig, dep: Deployment) -> int:
    """Parameters of one decoder layer on one rank."""
    d, D = cfg.head_dim, cfg.d_model
    attention = (2 * cfg.n_heads + 2 * cfg.n_kv_heads) * d * D // dep.tp
    experts = (cfg.n_experts // dep.ep) * cfg.matrices_per_expert * (cfg.expert_hidden // dep.tp) * D
    norms_router = 2 * D + cfg.n_experts * D
    return attention + experts + norms_router


def rank_params(cfg: ModelConfig, dep: Deployment, rank: int) -> int:
    stage = dep.coords(rank)[0]
    n = len(dep.stage_layers(cfg.n_layers)[stage]) * layer_params(cfg, dep)
    if stage == 0:
        n += cfg.vocab_size * cfg.d_model
    if stage == dep.pp - 1:
        n += cfg.d_model + cfg.vocab_size * cfg.d_model
    return n


def kv_cache_bytes(cfg: ModelConfig, dep: Deployment, workload: Workload, rank: int) -> int:
    """K and V `[b, total_len, g / tp, d]` for each layer of the rank's stage, b its sequences."""
    stage = dep.coords(rank)[0]
    layers = len(dep.stage_layers(cfg.n_layers)[stage])
    b = len(dep.rows_of(rank, workload.batch_size))
    per_layer = 2 * b * workload.total_len * (cfg.n_kv_heads // dep.tp) * cfg.head_dim
    return layers * per_layer * ITEMSIZE[cfg.dtype]


@dataclass(frozen=True)
class MemoryReport:
    """The fullest rank's bytes. `fits`: weights + KV cache within the device's memory."""

    weights_bytes: int
    kv_bytes: int
    capacity_bytes: float

    @property
    def total_bytes(self) -> int:
        return self.weights_bytes + self.kv_bytes

    @property
    def fits(self) -> bool:
        return self.total_bytes <= self.capacity_bytes


def memory_report(cfg: ModelConfig, dep: Deployment, workload: Workload,
                  capacity_bytes: float) -> MemoryReport:
    """`workload` is what one replica serves; the report is for its fullest rank."""
    per_rank = [(rank_params(cfg, dep, r) * ITEMSIZE[cfg.dtype], kv_cache_bytes(cfg, dep, workload, r))
                for r in range(dep.world_size)]
    weights, kv = max(per_rank, key=sum)
    return MemoryReport(weights, kv, capacity_bytes)
