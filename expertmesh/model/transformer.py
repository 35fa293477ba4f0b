"""The single-device reference model: embedding, pre-norm decoder layers, final norm, LM head.

Layers live in a `ModuleDict` keyed by their global index, so that pipeline parallelism can drop
the layers of other stages and every parameter keeps its name (`layers.3.moe.experts.w_up`).
A stage without the embedding takes hidden states `[b, L, D]` instead of token ids `[b, L]`; a
stage without the head returns hidden states instead of logits.

Two entry points share the layers: `forward` (equal-length sequences over a contiguous
`KVCache`, or no cache) and `forward_paged` (a ragged batch: many sequences, each at its own
position, flattened to `[N]` tokens, over per-layer block pools; `model/paged.py`).
`paged_steps` is `forward_paged` as a generator that yields while a token exchange is in flight
(`model/steps.py`), so that two micro-batches can take turns: two-batch overlap.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from expertmesh.config import ModelConfig
from expertmesh.model.attention import Attention, Contiguous, KVCache
from expertmesh.model.dense import DenseMLP
from expertmesh.model.layers import Embedding, Linear, RMSNorm
from expertmesh.model.mla import LatentAttention
from expertmesh.model.moe import MoEBlock, SharedExpert
from expertmesh.model.paged import KVPool, PagedBatch, PagedView
from expertmesh.model.routing import GroupLimitedRouter
from expertmesh.model.steps import Steps, run_steps
from expertmesh.model.synthetic import mark_shard, materialize
from expertmesh.trace import span


class DecoderLayer(nn.Module):
    """Attention, then the feed-forward: the MoE block `moe`, or in the config's dense layers the
    dense MLP `mlp` (`moe` is then None)."""

    def __init__(self, cfg: ModelConfig, index: int = 0):
        super().__init__()
        self.attn_norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        if cfg.kv_lora_rank:
            self.attn = LatentAttention(
                cfg.d_model, cfg.n_heads, cfg.head_dim - cfg.qk_rope_head_dim, cfg.qk_rope_head_dim,
                cfg.v_head_dim, cfg.kv_lora_rank, cfg.q_lora_rank, cfg.rope_theta, cfg.norm_eps,
                cfg.rope_interleave, cfg.yarn)
        else:
            self.attn = Attention(cfg.d_model, cfg.n_heads, cfg.n_kv_heads, cfg.head_dim, cfg.rope_theta,
                                  cfg.qkv_bias, cfg.norm_eps if cfg.qk_norm else None,
                                  cfg.norm_eps if cfg.qk_head_norm else None)
        self.moe_norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        dense = cfg.is_dense(index)
        self.mlp = DenseMLP(cfg.d_model, cfg.dense_hidden) if dense else None
        self.moe = None if dense else MoEBlock(
            cfg.d_model, cfg.n_experts, cfg.top_k, cfg.expert_hidden, cfg.expert_kind,
            cfg.renormalize, cfg.shared_expert_hidden, cfg.router_skew, cfg.capacity)
        if self.moe is not None:
            self.moe.router.skew_shift = cfg.router_skew_shift
        if self.moe is not None and cfg.router_kind != "softmax":
            self.moe.router = GroupLimitedRouter(cfg.d_model, cfg.n_experts, cfg.top_k, cfg.renormalize,
                                                 cfg.n_groups, cfg.topk_groups, cfg.routed_scaling,
                                                 cfg.router_kind.removesuffix("_grouped"))
        if self.moe is not None and cfg.shared_expert_hidden and not cfg.shared_expert_gate:
            self.moe.shared = SharedExpert(cfg.d_model, cfg.shared_expert_hidden, gated=False)

    def forward(self, x: torch.Tensor, kv) -> torch.Tensor:
        """x `[b, L, D]` with a KV view (`model/attention.py`) -> `[b, L, D]`."""
        return run_steps(self.steps(x, kv))

    def steps(self, x: torch.Tensor, kv) -> Steps[torch.Tensor]:
        """`forward` as a generator that yields while the MoE block's token exchange is in flight."""
        with span("attention"):
            x = x + self.attn(self.attn_norm(x), kv)
        if self.mlp is not None:
            return x + self.mlp(self.moe_norm(x))
        if kv.seq_lens is None:  # each row of x is one sequence
            return x + (yield from self.moe.steps(self.moe_norm(x), None))
        out = yield from self.moe.steps(self.moe_norm(x)[0], kv.seq_lens)
        return x + out.unsqueeze(0)  # a ragged batch, b = 1


class MoETransformer(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.embed: Embedding | None = Embedding(cfg.vocab_size, cfg.d_model)
        self.layers = nn.ModuleDict({str(i): DecoderLayer(cfg, i) for i in range(cfg.n_layers)})
        self.norm: RMSNorm | None = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.lm_head: Linear | None = Linear(cfg.d_model, cfg.vocab_size)
        # Called with (layer index, output `[b, L, D]`) after every layer held here, in order: the
        # engine's finite check, and test-only fault injection, which may overwrite the output.
        self.after_layer: list[Callable[[int, torch.Tensor], None]] = []

    def _layer_steps(self, name: str, h: torch.Tensor, kv) -> Steps[torch.Tensor]:
        h = yield from self.layers[name].steps(h, kv)
        for check in self.after_layer:
            check(int(name), h)
        return h

    def make_caches(self, batch: int, max_len: int) -> dict[str, KVCache]:
        """One preallocated KV cache per layer held here, for `batch` sequences of `max_len`."""
        caches = {}
        for name, layer in self.layers.items():
            attn = layer.attn
            ref = layer.attn_norm.weight
            caches[name] = KVCache(batch, max_len, attn.n_kv_heads, attn.head_dim, ref.dtype, ref.device,
                                   attn.keys_only)
        return caches

    def forward(self, x: torch.Tensor, caches: dict[str, KVCache] | None = None,
                rows: slice = slice(None), start: int = 0, all_logits: bool = False) -> torch.Tensor:
        """Token ids `[b, L]` (or hidden `[b, L, D]` on a later stage) -> logits `[b, V]` of the last
        position (`[b, L, V]` with `all_logits`), or hidden `[b, L, D]` on a stage without the head.

        `caches` (from `make_caches`) are read and written at batch `rows`, positions start..;
        without them the call attends within `x` only. What every layer of the forward shares
        (the EP exchange's bound): `model/forward_context.py`.
        """
        h = self.embed(x) if self.embed is not None else x
        for name in self.layers:
            kv = Contiguous(caches[name] if caches is not None else None, rows, start)
            h = run_steps(self._layer_steps(name, h, kv))
        if self.lm_head is None:
            return h
        h = self.norm(h if all_logits else h[:, -1])
        return self.lm_head(h)

    def make_pools(self, num_blocks: int, block_size: int) -> dict[str, KVPool]:
        """One KV block pool `[num_blocks, block_size, g, d]` per layer held here (keys-only under
        latent attention: `[num_blocks, block_size, 1, r + p]` once)."""
        pools = {}
        for name, layer in self.layers.items():
            attn, ref = layer.attn, layer.attn_norm.weight
            pools[name] = KVPool(num_blocks, block_size, attn.n_kv_heads, attn.head_dim, ref.dtype,
                                 ref.device, attn.keys_only)
        return pools

    def forward_paged(self, x: torch.Tensor, pools: dict[str, KVPool], batch: PagedBatch) -> torch.Tensor:
        """Token ids `[N]` (or hidden `[N, D]` on a later stage) of a ragged batch -> logits `[S, V]`
        of each sequence's last new token, or hidden `[N, D]` on a stage without the head. The EP
        exchange's bound comes from the forward's context (`model/forward_context.py`)."""
        return run_steps(self.paged_steps(x, pools, batch))

    def paged_steps(self, x: torch.Tensor, pools: dict[str, KVPool], batch: PagedBatch) -> Steps[torch.Tensor]:
        """`forward_paged` as a generator that yields while a token exchange is in flight."""
        h = (self.embed(x) if self.embed is not None else x).unsqueeze(0)  # [1, N, D]
        attn = next((layer.attn for layer in self.layers.values()), None)
        if isinstance(attn, Attention):
            batch.plan(attn.head_dim, attn.theta)
        else:
            batch.plan(None, None)  # latent attention rotates by its own tables
        for name in self.layers:
            h = yield from self._layer_steps(name, h, PagedView(pools[name], batch))
        h = h[0]
        if self.lm_head is None:
            return h
        return self.lm_head(self.norm(h[batch.last]))


def build_model(cfg: ModelConfig) -> MoETransformer:
    """The model's structure on the `meta` device: no memory, ready to be sharded or materialized."""
    model = MoETransformer(cfg)
    if cfg.tie_embeddings:
        mark_shard(model.lm_head, "weight", (cfg.vocab_size, cfg.d_model),
                   (slice(None), slice(None)), source="embed.weight")
    return model


def reference_model(cfg: ModelConfig, seed: int = 0, dtype: torch.dtype | None = None,
                    device: torch.device | str = "cpu") -> MoETransformer:
    """The whole model on one device, with the synthetic weights of `seed`."""
    return materialize(build_model(cfg), seed, dtype or cfg.torch_dtype, device)


def parameter_bytes(model: nn.Module, dtype: torch.dtype) -> int:
    """Bytes of the parameters this (possibly sharded, possibly meta) model holds, in `dtype`."""
    return sum(p.numel() for p in model.parameters()) * dtype.itemsize
