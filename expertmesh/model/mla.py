"""Multi-head latent attention (DeepSeek-V2 / V3) over a cache of the latent: decode absorbed, prefill expanded.

Notation: b sequences, L new positions, h query heads, n qk_nope_head_dim, p qk_rope_head_dim,
v v_head_dim, r kv_lora_rank, D d_model.

  query   q = q_b(norm(q_a(x))) (or wq(x))        [b, L, h, n + p] = nope | rope part
  latent  kv_a(x) = c | k_pe: c = norm(c) [b, L, r], k_pe [b, L, p] RoPE'd, one for all heads
  kv_b    [h * (n + v), r]: per head W_uk [n, r] then W_uv [v, r]

Head h's key is W_uk c | k_pe and its value W_uv c, so q_nope . (W_uk c) = (q_nope W_uk) . c
and softmax(.) (W_uv c) = W_uv (softmax(.) c): attention runs on the latent itself, as one KV
head shared by all h query heads (multi-query), with the query absorbed
q_lat = q_nope W_uk | q_pe `[b, L, h, r + p]`, and W_uv applied to its output. Only c | k_pe,
`r + p` per token and layer, against h (n + p + v) for full keys and values: the KV view's
contract takes it as K and as V, and the cache, keys-only (`KeysValues`), holds and writes it once.

Prefill does not absorb. When no sequence of the forward has cached positions (the view's
`fresh`), the latent of its L new tokens is expanded to per-head keys W_uk c | k_pe and values
W_uv c, and the queries attend to them as ordinary multi-head attention (the latent is still what
is cached). Per head, multiply-adds (as 1 FLOP pair each): absorbing costs n r per query token
(q_nope W_uk) and v r per query token (W_uv out), then (r + p) + r per query-key pair; expanding
costs (n + v) r per key token, then (n + p) + v per pair. A fresh prefill has as many key tokens
as query tokens, so the per-token terms are equal and the L (L + 1) / 2 pairs decide: for
DeepSeek-V3 (r 512, p 64, n = v = 128) 1088 against 320 per pair and head, 3.4x fewer attention
multiply-adds expanded. A decode token (1 query over S cached keys) would pay (n + v) r = 131072
per cached key expanded against (r + p) + r = 1088 absorbed: decode, and any forward over cached
positions (a chunk after the first, a cached prefix), stays absorbed.

The softmax scale is 1 / sqrt(n + p) (the model's); the views apply 1 / sqrt(r + p), so q_lat
is scaled by their ratio first. YaRN (`config.Yarn`) changes RoPE's frequencies, scales the
rotated parts by its attention factor and the softmax scale by its mscale^2. Tensor parallelism
splits heads (q_b or wq, kv_b by rows, wo by columns); the latent projections, their norms and the
cache are whole on every rank.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from expertmesh.config import Yarn
from expertmesh.model.attention import rope_tables, rotary
from expertmesh.model.layers import Linear, RMSNorm


class LatentAttention(nn.Module):
    """x `[b, L, D]` and a KV view (`model/attention.py`) -> `[b, L, D]`. `n_kv_heads`, `head_dim`,
    `keys_only`: the one cached head `r + p` wide, whose values are its keys, as the engine
    allocates caches and pools."""

    keys_only = True

    def __init__(self, d_model: int, n_heads: int, nope: int, rope: int, v_dim: int, kv_rank: int,
                 q_rank: int, theta: float, eps: float, interleave: bool, yarn: Yarn | None = None):
        super().__init__()
        self.n_heads, self.nope, self.rope, self.v_dim, self.kv_rank = n_heads, nope, rope, v_dim, kv_rank
        self.theta, self.interleave, self.low_rank_q, self.yarn = theta, interleave, q_rank > 0, yarn
        self.rope_scale, self.softmax_scale = 1.0, (nope + rope) ** -0.5
        if yarn is not None:
            self.rope_scale = yarn.attention_factor or (
                _mscale(yarn.factor, yarn.mscale) / _mscale(yarn.factor, yarn.mscale_all_dim)
                if yarn.mscale and yarn.mscale_all_dim else _mscale(yarn.factor, 1.0))
            if yarn.mscale_all_dim:
                self.softmax_scale *= _mscale(yarn.factor, yarn.mscale_all_dim) ** 2
        self.n_kv_heads, self.head_dim = 1, kv_rank + rope
        if q_rank:
            self.q_a, self.q_a_norm = Linear(d_model, q_rank), RMSNorm(q_rank, eps)
            self.q_b = Linear(q_rank, n_heads * (nope + rope))
        else:
            self.wq = Linear(d_model, n_heads * (nope + rope))
        self.kv_a = Linear(d_model, kv_rank + rope)
        self.kv_a_norm = RMSNorm(kv_rank, eps)
        self.kv_b = Linear(kv_rank, n_heads * (nope + v_dim))
        self.wo = Linear(n_heads * v_dim, d_model)

    def _rotate(self, x: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        """RoPE on `x [b, L, heads, p]`; interleaved pairs (2i, 2i+1) are first regrouped as halves,
        the same for queries and keys, which leaves their dot products as the model's."""
        if self.interleave:
            x = torch.cat([x[..., 0::2], x[..., 1::2]], dim=-1)
        if self.yarn is None:
            return rotary(x, *rope_tables(pos, self.rope, self.theta))
        inv_freq = yarn_inv_freq(self.yarn, self.rope, self.theta, x.device)
        return rotary(x, *rope_tables(pos, self.rope, self.theta, inv_freq)) * self.rope_scale

    def forward(self, x: torch.Tensor, kv) -> torch.Tensor:
        b, L, _ = x.shape
        h, n, p, r = self.n_heads, self.nope, self.rope, self.kv_rank
        q = self.q_b(self.q_a_norm(self.q_a(x))) if self.low_rank_q else self.wq(x)
        q_nope, q_pe = q.view(b, L, h, n + p).split([n, p], dim=-1)
        c, k_pe = self.kv_a(x).split([r, p], dim=-1)
        pos = kv.positions(L, x.device)
        latent = torch.cat([self.kv_a_norm(c), self._rotate(k_pe.view(b, L, 1, p), pos)[:, :, 0]], -1)
        cached = latent.unsqueeze(2)  # [b, L, 1, r + p]
        q_pe = self._rotate(q_pe, pos)
        if kv.fresh:
            kv.store(cached, cached)
            out = self._expanded(q_nope, q_pe, latent, kv.seq_lens)
        else:
            w = self.kv_b.weight.view(h, n + self.v_dim, r)
            q_lat = torch.cat([torch.einsum("blhn,hnr->blhr", q_nope, w[:, :n]), q_pe], -1)
            q_lat = q_lat * (self.softmax_scale * math.sqrt(r + p))
            out = kv.attend(q_lat, cached, cached)[..., :r]  # [b, L, h, r]
            out = torch.einsum("blhr,hvr->blhv", out, w[:, n:])
        return self.wo(out.reshape(b, L, h * self.v_dim))

    def _expanded(self, q_nope: torch.Tensor, q_pe: torch.Tensor, latent: torch.Tensor,
                  seq_lens: list[int] | None) -> torch.Tensor:
        """Attention of new tokens that are all their sequences hold, over keys and values expanded
        from their latent: q_nope `[b, L, h, n]`, q_pe `[b, L, h, p]` (rotated), latent
        `[b, L, r + p]` -> `[b, L, h, v]`; causal within each row, or within each of the
        consecutive sequences of `seq_lens` (a ragged batch, b = 1)."""
        b, L, h = q_nope.shape[:3]
        n, p, r = self.nope, self.rope, self.kv_rank
        k_nope, v = self.kv_b(latent[..., :r]).view(b, L, h, n + self.v_dim).split([n, self.v_dim], -1)
        k = torch.cat([k_nope, latent[..., None, r:].expand(b, L, h, p)], -1)
        if L == 0:  # a rank with no sequence this step (expert parallelism): [b, 0, h, v]
            return v
        q = torch.cat([q_nope, q_pe], -1)
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))  # [b, h, L, .]
        pieces = [L] if seq_lens is None else seq_lens
        out = [F.scaled_dot_product_attention(qs, ks, vs, is_causal=True, scale=self.softmax_scale)
               for qs, ks, vs in zip(q.split(pieces, 2), k.split(pieces, 2), v.split(pieces, 2))]
        return torch.cat(out, 2).transpose(1, 2)


def _mscale(factor: float, mscale: float) -> float:
    return 0.1 * mscale * math.log(factor) + 1.0 if factor > 1 else 1.0


def yarn_inv_freq(yarn: Yarn, dim: int, theta: float, device: torch.device) -> torch.Tensor:
    """RoPE's `[dim/2]` inverse frequencies under YaRN, built on `device` (no copy from the host):
    dimension pairs below the one that turns `beta_fast` times over `original_max` positions keep
    theta's frequency, those above the one that turns `beta_slow` times take it divided by
    `factor`, those between a linear blend."""
    def turning_dim(rotations: float) -> float:
        return dim * math.log(yarn.original_max / (rotations * 2 * math.pi)) / (2 * math.log(theta))

    low, high = turning_dim(yarn.beta_fast), turning_dim(yarn.beta_slow)
    if yarn.truncate:
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    high = high + 0.001 if low == high else high
    base = 1.0 / theta ** (torch.arange(0, dim, 2, dtype=torch.float32, device=device) / dim)
    ramp = ((torch.arange(dim // 2, dtype=torch.float32, device=device) - low) / (high - low)).clamp(0, 1)
    return base / yarn.factor * ramp + base * (1 - ramp)
