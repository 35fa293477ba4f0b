"""Grouped-query attention with rotary position embeddings, over a KV cache.

Notation: b sequences, L new positions, S = start + L cached positions, h query heads,
g KV heads (h % g == 0), d head_dim, D d_model.

The attention module projects and rotates; where keys and values are kept and which positions a
query sees is the job of the KV view it is given: `Contiguous` (rows of a preallocated
`KVCache`, or no cache at all) or `PagedView` (`model/paged.py`: a ragged batch of sequences
over a pool of fixed-size blocks). A view has `rope(length, head_dim, theta, device)` (the
rotary tables `cos, sin: [length, d]` fp32 of its new tokens' positions; a paged view computes
them once per step for all layers), `attend(q, k, v)` (store k, v; return the attention output),
`store(k, v)` (only store them), `fresh` (True when no sequence of the forward has a cached
position before its new ones: its new tokens' keys are all it attends to) and `seq_lens` (the
lengths of the consecutive sequences of a ragged batch; None when each row is a sequence).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from expertmesh.model.layers import Linear, RMSNorm


def rope_tables(positions: torch.Tensor, head_dim: int, theta: float,
                inv_freq: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """`positions: [L]` -> cos, sin `[L, d]` fp32 (half-split convention: each angle twice), the
    sine negated on the first half (what `rotary` multiplies the halves it swaps by); `inv_freq`
    `[d/2]` (on the positions' device) replaces theta's frequencies when given (RoPE scaling)."""
    d = head_dim
    if inv_freq is None:
        inv_freq = 1.0 / theta ** (torch.arange(0, d, 2, dtype=torch.float32, device=positions.device) / d)
    angles = torch.outer(positions.float(), inv_freq)  # [L, d/2]
    # cos is even and sin odd: the sign of the rotated half rides in the table, once a step,
    # rather than in a negation of every layer's queries and keys
    angles = torch.cat([-angles, angles], -1)  # [L, d]
    return angles.cos(), angles.sin()


def rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate `x: [b, L, heads, d]` by the tables `cos, sin: [L, d]` of its positions (`rope_tables`)."""
    xf = x.float()
    # the swap of halves is a roll; the table's sign makes it (-x2, x1)
    return torch.addcmul(xf * cos[:, None], xf.roll(x.shape[-1] // 2, -1), sin[:, None]).to(x.dtype)


class KeysValues:
    """One layer's cached keys and values `k, v: [..., g, d]`, zeroed, allocated once.

    `keys_only`: the values are the keys, one tensor held and written once (`v is k`): latent
    attention caches its latent `[..., 1, r + p]` as its keys and as its values (`model/mla.py`).
    """

    def __init__(self, shape: tuple[int, ...], dtype: torch.dtype, device: torch.device,
                 keys_only: bool = False):
        self.keys_only = keys_only
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = self.k if keys_only else torch.zeros_like(self.k)

    @property
    def nbytes(self) -> int:
        return self.k.nbytes if self.keys_only else self.k.nbytes + self.v.nbytes


class KVCache(KeysValues):
    """Keys and values of one layer for a rank's sequences: `k, v: [batch, max_len, g, d]`.

    Allocated once for the whole run (batch x prompt + generation), written in place.
    """

    def __init__(self, batch: int, max_len: int, n_kv_heads: int, head_dim: int,
                 dtype: torch.dtype, device: torch.device, keys_only: bool = False):
        super().__init__((batch, max_len, n_kv_heads, head_dim), dtype, device, keys_only)

    def update(self, rows: slice, start: int, k: torch.Tensor, v: torch.Tensor):
        """Store `k, v: [b, L, g, d]` at `rows`, positions start.. (keys only: k, which v must
        equal); return all cached `[b, S, g, d]`."""
        end = start + k.shape[1]
        self.k[rows, start:end] = k
        if not self.keys_only:
            self.v[rows, start:end] = v
        return self.k[rows, :end], self.v[rows, :end]


class Contiguous:
    """Equal-length sequences at rows `rows` of `cache`, new positions start .. start+L-1; with no
    cache, the sequences of `x` alone (start must be 0)."""

    seq_lens = None

    def __init__(self, cache: KVCache | None, rows: slice = slice(None), start: int = 0):
        if cache is None and start != 0:
            raise ValueError("attention without a KV cache must start at position 0")
        self.cache, self.rows, self.start = cache, rows, start

    def positions(self, length: int, device: torch.device) -> torch.Tensor:
        return torch.arange(self.start, self.start + length, device=device)

    def rope(self, length: int, head_dim: int, theta: float, device: torch.device):
        return rope_tables(self.positions(length, device), head_dim, theta)

    @property
    def fresh(self) -> bool:
        return self.start == 0

    def store(self, k: torch.Tensor, v: torch.Tensor) -> None:
        """Keep k, v `[b, L, g, d]` at the new positions (nothing without a cache)."""
        if self.cache is not None:
            self.cache.update(self.rows, self.start, k, v)

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """q `[b, L, h, d]`, k, v `[b, L, g, d]` -> `[b, L, h, d]`."""
        if self.cache is not None:
            k, v = self.cache.update(self.rows, self.start, k, v)
        b, L = q.shape[:2]
        if b == 0:
            return q
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))  # [b, heads, positions, d]
        S = k.shape[2]
        if L == 1:
            mask = None  # one new position sees every cached one
        else:
            q_pos = torch.arange(self.start, self.start + L, device=q.device)[:, None]
            mask = torch.arange(S, device=q.device)[None, :] <= q_pos
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask,
                                             enable_gqa=q.shape[1] != k.shape[1])
        return out.transpose(1, 2)


class Attention(nn.Module):
    """Multi-head attention: x `[b, L, D]` -> `[b, L, D]` (a ragged batch is `b = 1`, L = N tokens).

    Tensor parallelism shards the projections by heads and lowers `n_heads` / `n_kv_heads` to the
    local counts; nothing here changes. `qkv_bias`: the q, k, v projections have a bias.
    `qk_norm_eps`: RMSNorm over the whole projected query `[h * d]` and key `[g * d]`, before
    splitting heads and RoPE (OLMoE); None for none. `qk_head_norm_eps`: RMSNorm over `d` of each
    query and key head, before RoPE (Qwen3-MoE); its weight `[d]` is shared by all heads, so
    tensor parallelism leaves it whole.
    """

    keys_only = False  # its caches and pools hold keys and values apart (`KeysValues`)

    def __init__(self, d_model: int, n_heads: int, n_kv_heads: int, head_dim: int, theta: float,
                 qkv_bias: bool = False, qk_norm_eps: float | None = None,
                 qk_head_norm_eps: float | None = None):
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim, self.theta = n_heads, n_kv_heads, head_dim, theta
        self.wq = Linear(d_model, n_heads * head_dim, qkv_bias)
        self.wk = Linear(d_model, n_kv_heads * head_dim, qkv_bias)
        self.wv = Linear(d_model, n_kv_heads * head_dim, qkv_bias)
        self.wo = Linear(n_heads * head_dim, d_model)
        with_norm = qk_norm_eps is not None
        self.q_norm = RMSNorm(n_heads * head_dim, qk_norm_eps) if with_norm else None
        self.k_norm = RMSNorm(n_kv_heads * head_dim, qk_norm_eps) if with_norm else None
        per_head = qk_head_norm_eps is not None
        self.q_head_norm = RMSNorm(head_dim, qk_head_norm_eps) if per_head else None
        self.k_head_norm = RMSNorm(head_dim, qk_head_norm_eps) if per_head else None

    def forward(self, x: torch.Tensor, kv) -> torch.Tensor:
        """x `[b, L, D]` and a KV view (`Contiguous` or `PagedView`) -> `[b, L, D]`."""
        b, L, _ = x.shape
        q, k = self.wq(x), self.wk(x)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = q.view(b, L, self.n_heads, self.head_dim), k.view(b, L, self.n_kv_heads, self.head_dim)
        if self.q_head_norm is not None:
            q, k = self.q_head_norm(q), self.k_head_norm(k)
        cos, sin = kv.rope(L, self.head_dim, self.theta, x.device)
        # queries and keys rotate in one pass: one copy joins them, saving the three ops of a second rotation
        q, k = rotary(torch.cat([q, k], 2), cos, sin).split([self.n_heads, self.n_kv_heads], 2)
        v = self.wv(x).view(b, L, self.n_kv_heads, self.head_dim)
        out = kv.attend(q, k, v)
        return self.wo(out.reshape(b, L, self.n_heads * self.head_dim))
