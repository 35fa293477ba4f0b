"""Memory one rank needs, by parameter arithmetic (no model built): weights, KV cache,
activations at their peak, communication buffers and a runtime reserve.

Counts follow the engine's sharding: attention projections split by heads under TP, experts
split by hidden units under TP and by expert under EP, a dense layer's MLP split under TP and
replicated under EP, layers split by stage under PP; the embedding lives on the first stage, the
final norm and LM head on the last.

Activations peak in a prefill layer, on the rank's t = rows x prompt tokens of one micro-batch:
the residual stream and the normed input `[t, D]`, then the larger of attention's q, k, v and
output `[t, (2h + 2g) d / tp]` and the MoE block's permuted rows `[N, D]` in and out with their
expert hidden `[N, (m-1) H / tp]`, N = t k (under EP: the rows a rank receives per exchange
chunk, at the expected share). Communication buffers: the EP send and receive buffers of one
chunk `2 [N, D]`, a pipeline stage's received hidden states `[t, D]`. The runtime reserve (CUDA
context, cuBLAS and NCCL workspaces, allocator fragmentation) is an assumption: 10% of the
device, what vLLM's default gpu_memory_utilization 0.9 leaves.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from expertmesh.config import ModelConfig, Workload
from expertmesh.deployment import Deployment

ITEMSIZE = {"bf16": 2, "fp32": 4}


def attention_params(cfg: ModelConfig, tp: int) -> int:
    """Attention's parameters on one of `tp` ranks that split its heads. Latent attention (MLA):
    the query's low-rank pair, the latent's projection and norm whole, q_b / wq, kv_b, wo split."""
    d, D, h = cfg.head_dim, cfg.d_model, cfg.n_heads
    if not cfg.kv_lora_rank:
        return (2 * h + 2 * cfg.n_kv_heads) * d * D // tp + (2 * d if cfg.qk_head_norm else 0)
    r, p, v, ql = cfg.kv_lora_rank, cfg.qk_rope_head_dim, cfg.v_head_dim, cfg.q_lora_rank
    query = D * ql + ql + ql * h * d // tp if ql else D * h * d // tp
    return query + D * (r + p) + r + (r * h * (d - p + v) + h * v * D) // tp


def layer_params(cfg: ModelConfig, dep: Deployment, attn_tp: int | None = None,
                 dense: bool = False, slots: int | None = None) -> int:
    """Parameters of one decoder layer on one rank; attention split over `attn_tp` ranks
    (default: the TP size); `dense`: a dense layer's (its MLP instead of router and experts);
    `slots`: the experts the rank holds (default E / ep)."""
    D = cfg.d_model
    attention = attention_params(cfg, attn_tp or dep.tp)
    if dense:
        return attention + 3 * (cfg.dense_hidden // dep.tp) * D + 2 * D
    experts = (slots or cfg.n_experts // dep.ep) * cfg.matrices_per_expert * (cfg.expert_hidden // dep.tp) * D
    norms_router = 2 * D + cfg.n_experts * (D + (cfg.router_kind == "sigmoid_grouped"))  # + bias
    shared = 3 * (cfg.shared_expert_hidden // dep.tp) * D + (D if cfg.shared_expert_gate else 0)
    return attention + experts + norms_router + (shared if cfg.shared_expert_hidden else 0)


def rank_params(cfg: ModelConfig, dep: Deployment, rank: int, attn_tp: int | None = None,
                slots: int | None = None) -> int:
    stage = dep.coords(rank)[0]
    n = sum(layer_params(cfg, dep, attn_tp, cfg.is_dense(i), slots) for i in dep.stage_layers(cfg.n_layers)[stage])
    if stage == 0:
        n += cfg.vocab_size * cfg.d_model
    if stage == dep.pp - 1:
        n += cfg.d_model + cfg.vocab_size * cfg.d_model
    return n


def kv_cache_bytes(cfg: ModelConfig, dep: Deployment, workload: Workload, rank: int,
                   attn_tp: int | None = None) -> int:
    """K and V `[b, total_len, g / tp, d]` for each layer of the rank's stage, b its sequences;
    under EP with attention TP (`attn_tp` > 1), b is its attention group's sequences and the KV
    heads are split over the group. Latent attention: the latent `[b, total_len, 1, r + p]` once
    (the engine's keys-only pool), whole on every rank."""
    stage, i = dep.coords(rank)
    layers = len(dep.stage_layers(cfg.n_layers)[stage])
    a = attn_tp or dep.tp
    if dep.ep > 1 and a > 1:
        first = stage * dep.inner + i // a * a
        b = sum(len(dep.rows_of(r, workload.batch_size)) for r in range(first, first + a))
    else:
        b = len(dep.rows_of(rank, workload.batch_size))
    per_layer = b * workload.total_len * cfg.kv_elements_per_token(a)
    return layers * per_layer * ITEMSIZE[cfg.dtype]


RESERVE_FRACTION = 0.1


@dataclass(frozen=True)
class MemoryReport:
    """The fullest rank's bytes. `fits`: everything within the device's memory."""

    weights_bytes: int
    kv_bytes: int
    capacity_bytes: float
    activation_bytes: float = 0.0
    buffer_bytes: float = 0.0
    reserve_bytes: float = 0.0

    @property
    def total_bytes(self) -> float:
        return self.weights_bytes + self.kv_bytes + self.activation_bytes + self.buffer_bytes + self.reserve_bytes

    @property
    def fits(self) -> bool:
        return self.total_bytes <= self.capacity_bytes


def memory_report(cfg: ModelConfig, dep: Deployment, workload: Workload,
                  capacity_bytes: float, weight_itemsize: int | None = None,
                  kv_itemsize: int | None = None, attn_tp: int | None = None,
                  slots: list[int] | None = None) -> MemoryReport:
    """Weights and KV cache only; `workload` is what one replica serves; the report is for its
    fullest rank. Item sizes default to the model dtype's. `slots`: experts each rank holds
    (plain EP; default E / ep each)."""
    w_isz = weight_itemsize or ITEMSIZE[cfg.dtype]
    kv_scale = (kv_itemsize or ITEMSIZE[cfg.dtype]) / ITEMSIZE[cfg.dtype]
    per_rank = [(rank_params(cfg, dep, r, attn_tp, slots[r] if slots else None) * w_isz,
                 int(kv_cache_bytes(cfg, dep, workload, r, attn_tp) * kv_scale))
                for r in range(dep.world_size)]
    weights, kv = max(per_rank, key=sum)
    return MemoryReport(weights, kv, capacity_bytes)


def peak_activations(sc) -> tuple[float, float]:
    """(activation bytes, communication buffer bytes) of the fullest rank's prefill layer."""
    cfg, dep, w, isz = sc.cfg, sc.deployment, sc.replica_workload, sc.itemsize
    D, d, k = cfg.d_model, cfg.head_dim, cfg.top_k
    held = max(len(dep.rows_of(r, w.batch_size)) for r in range(dep.inner))
    t = -(-held // sc.micro_batches(True)) * w.prompt_len
    a = sc.attn_tp  # attention TP: a group's tokens (a x a rank's) with 1/a of the heads each
    attention = (a if dep.ep > 1 else 1) * t * (2 * cfg.n_heads + 2 * cfg.n_kv_heads) * d / a
    rows = t * k / (sc.a2a_chunks if dep.ep > 1 else 1)
    if dep.ep > 1:  # a rank receives its experts' share of every rank's rows
        rows = rows * dep.ep * max(sc.rank_shares())
    moe = rows * (2 * D + (cfg.matrices_per_expert - 1) * cfg.expert_hidden / dep.tp)
    activations = (2 * t * D + max(attention, moe)) * isz
    buffers = (2 * rows * D * sc.dispatch_itemsize if dep.ep > 1 else 0.0) + (t * D * isz if dep.pp > 1 else 0.0)
    return activations, buffers


def scenario_memory(sc) -> MemoryReport:
    """Everything one rank of the scenario holds at its peak."""
    hw = sc.hardware
    base = memory_report(sc.cfg, sc.deployment, sc.replica_workload, hw.hbm_bytes,
                         sc.weight_itemsize, sc.kv_itemsize, sc.attn_tp, sc.slots)
    activations, buffers = peak_activations(sc)
    reserve = RESERVE_FRACTION * hw.hbm_bytes if hw.launch_overlaps else 0.0
    return dataclasses.replace(base, activation_bytes=activations, buffer_bytes=buffers,
                               reserve_bytes=reserve)
