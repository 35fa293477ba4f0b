"""The single-device reference model: embedding, pre-norm decoder layers, final norm, LM head.

Layers live in a `ModuleDict` keyed by their global index, so that pipeline parallelism can drop
the layers of other stages and every parameter keeps its name (`layers.3.moe.experts.w_up`).
A stage without the embedding takes hidden states `[b, L, D]` instead of token ids `[b, L]`; a
stage without the head returns hidden states instead of logits.

Two entry points share the layers: `forward` (equal-length sequences over a contiguous
`KVCache`, or no cache) and `forward_paged` (a ragged batch: many sequences, each at its own
position, flattened to `[N]` tokens, over per-layer block pools; `model/paged.py`).
"""

from __future__ import annotations

import torch
from torch import nn

from expertmesh.config import ModelConfig
from expertmesh.model.attention import Attention, Contiguous, KVCache
from expertmesh.model.layers import Embedding, Linear, RMSNorm
from expertmesh.model.moe import MoEBlock
from expertmesh.model.paged import KVPool, PagedBatch, PagedView
from expertmesh.model.synthetic import mark_shard, materialize
from expertmesh.trace import span


class DecoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.attn_norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.attn = Attention(cfg.d_model, cfg.n_heads, cfg.n_kv_heads, cfg.head_dim, cfg.rope_theta,
                              cfg.qkv_bias, cfg.norm_eps if cfg.qk_norm else None)
        self.moe_norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.moe = MoEBlock(cfg.d_model, cfg.n_experts, cfg.top_k, cfg.expert_hidden,
                            cfg.expert_kind, cfg.renormalize, cfg.shared_expert_hidden,
                            cfg.router_skew, cfg.capacity)

    def forward(self, x: torch.Tensor, kv) -> torch.Tensor:
        """x `[b, L, D]` with a KV view (`model/attention.py`) -> `[b, L, D]`."""
        with span("attention"):
            x = x + self.attn(self.attn_norm(x), kv)
        if kv.seq_lens is None:  # each row of x is one sequence
            return x + self.moe(self.moe_norm(x))
        return x + self.moe(self.moe_norm(x)[0], kv.seq_lens).unsqueeze(0)  # a ragged batch, b = 1


class MoETransformer(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.embed: Embedding | None = Embedding(cfg.vocab_size, cfg.d_model)
        self.layers = nn.ModuleDict({str(i): DecoderLayer(cfg) for i in range(cfg.n_layers)})
        self.norm: RMSNorm | None = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.lm_head: Linear | None = Linear(cfg.d_model, cfg.vocab_size)

    def make_caches(self, batch: int, max_len: int) -> dict[str, KVCache]:
        """One preallocated KV cache per layer held here, for `batch` sequences of `max_len`."""
        caches = {}
        for name, layer in self.layers.items():
            attn = layer.attn
            ref = attn.wk.weight
            caches[name] = KVCache(batch, max_len, attn.n_kv_heads, attn.head_dim, ref.dtype, ref.device)
        return caches

    def forward(self, x: torch.Tensor, caches: dict[str, KVCache] | None = None,
                rows: slice = slice(None), start: int = 0, all_logits: bool = False) -> torch.Tensor:
        """Token ids `[b, L]` (or hidden `[b, L, D]` on a later stage) -> logits `[b, V]` of the last
        position (`[b, L, V]` with `all_logits`), or hidden `[b, L, D]` on a stage without the head.

        `caches` (from `make_caches`) are read and written at batch `rows`, positions start..;
        without them the call attends within `x` only.
        """
        h = self.embed(x) if self.embed is not None else x
        for name, layer in self.layers.items():
            h = layer(h, Contiguous(caches[name] if caches is not None else None, rows, start))
        if self.lm_head is None:
            return h
        h = self.norm(h if all_logits else h[:, -1])
        return self.lm_head(h)

    def make_pools(self, num_blocks: int, block_size: int) -> dict[str, KVPool]:
        """One KV block pool `[num_blocks, block_size, g, d]` per layer held here."""
        pools = {}
        for name, layer in self.layers.items():
            attn, ref = layer.attn, layer.attn.wk.weight
            pools[name] = KVPool(num_blocks, block_size, attn.n_kv_heads, attn.head_dim, ref.dtype,
                                 ref.device)
        return pools

    def forward_paged(self, x: torch.Tensor, pools: dict[str, KVPool], batch: PagedBatch) -> torch.Tensor:
        """Token ids `[N]` (or hidden `[N, D]` on a later stage) of a ragged batch -> logits `[S, V]`
        of each sequence's last new token, or hidden `[N, D]` on a stage without the head."""
        h = (self.embed(x) if self.embed is not None else x).unsqueeze(0)  # [1, N, D]
        for name, layer in self.layers.items():
            h = layer(h, PagedView(pools[name], batch))
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
