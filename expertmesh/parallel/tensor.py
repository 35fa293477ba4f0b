"""Tensor parallelism applied to a plain model (the baseline's "TP shard of every expert").

Attention: the query, key and value projections are split by heads (column parallel, each rank
keeps `n_heads / tp` query heads and `n_kv_heads / tp` KV heads, and their KV cache); the output
projection is split along its input (row parallel) and its partial outputs are summed with an
all-reduce of `[b, L, D]`. Experts: every expert's hidden dimension is split (up and gate column
parallel, down row parallel); the MoE block's output `[b, L, D]` is all-reduced once, after the
weighted combine, which is linear in the partial outputs. The router is replicated, so every
rank routes identically. A shared expert (Qwen2-MoE) is split like the experts; its gate is
replicated, so sigmoid(gate(x)) * partial output is a partial sum of the same all-reduce.
A dense layer's MLP (`model/dense.py`) is split like an expert and all-reduced alike.
The q / k norms of OLMoE span all heads: each rank keeps its heads' slice of the norm weight and
all-reduces the sum of squares `[b, L, 1]` (`ShardedRMSNorm`). Latent attention (`model/mla.py`)
splits heads alike; its latent is computed and cached whole on every rank.
"""

from __future__ import annotations

import functools

import torch
import torch.distributed as dist
from torch import nn

from expertmesh.model.attention import Attention
from expertmesh.model.layers import Linear, RMSNorm, meta_weight
from expertmesh.model.mla import LatentAttention
from expertmesh.model.synthetic import mark_shard
from expertmesh.model.transformer import MoETransformer


def _split_linear(old: Linear, dim: int, tp: int, rank: int) -> Linear:
    """This rank's 1/tp of `old` along `dim` (0: output features, 1: input features)."""
    out_f, in_f = old.weight.shape
    size = (out_f if dim == 0 else in_f) // tp
    part = slice(rank * size, (rank + 1) * size)
    if old.bias is not None and dim == 1:
        raise ValueError("a row-parallel linear layer with a bias is not supported; the bias "
                         "would be added tp times")
    new = Linear(in_f if dim == 0 else size, size if dim == 0 else out_f, old.bias is not None)
    index = [slice(None), slice(None)]
    index[dim] = part
    mark_shard(new, "weight", (out_f, in_f), index)
    if new.bias is not None:
        mark_shard(new, "bias", (out_f,), (part,))
    return new


class ShardedRMSNorm(nn.Module):
    """RMSNorm over a feature dimension split across the TP group: x `[..., F/tp]` -> same shape.

    The mean of squares is taken over all F features: one all-reduce of `[..., 1]` per call.
    """

    def __init__(self, old: RMSNorm, group: dist.ProcessGroup, tp: int, rank: int):
        super().__init__()
        full = old.weight.shape[0]
        size = full // tp
        self.eps, self.full, self.group = old.eps, full, group
        self.weight = meta_weight(size)
        mark_shard(self, "weight", (full,), (slice(rank * size, (rank + 1) * size),))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        sum_sq = xf.pow(2).sum(-1, keepdim=True)
        dist.all_reduce(sum_sq, group=self.group)
        return (xf * torch.rsqrt(sum_sq / self.full + self.eps)).to(x.dtype) * self.weight


def _all_reduce_output(group: dist.ProcessGroup):
    def hook(module: nn.Module, args, output: torch.Tensor) -> torch.Tensor:
        dist.all_reduce(output, group=group)
        return output
    return hook


def _split_attention(attn: Attention, group: dist.ProcessGroup, tp: int, tp_rank: int) -> None:
    attn.wq, attn.wk, attn.wv = (_split_linear(lin, 0, tp, tp_rank) for lin in (attn.wq, attn.wk, attn.wv))
    attn.wo = _split_linear(attn.wo, 1, tp, tp_rank)
    attn.n_heads //= tp
    attn.n_kv_heads //= tp
    if attn.q_norm is not None:
        attn.q_norm = ShardedRMSNorm(attn.q_norm, group, tp, tp_rank)
        attn.k_norm = ShardedRMSNorm(attn.k_norm, group, tp, tp_rank)
    attn.register_forward_hook(_all_reduce_output(group))


def _split_latent_attention(attn: LatentAttention, group: dist.ProcessGroup, tp: int, tp_rank: int) -> None:
    """Heads split: the query's up-projection and kv_b by rows, wo by columns; the latent's
    projections and norms whole, so each rank caches the whole latent."""
    if attn.low_rank_q:
        attn.q_b = _split_linear(attn.q_b, 0, tp, tp_rank)
    else:
        attn.wq = _split_linear(attn.wq, 0, tp, tp_rank)
    attn.kv_b = _split_linear(attn.kv_b, 0, tp, tp_rank)
    attn.wo = _split_linear(attn.wo, 1, tp, tp_rank)
    attn.n_heads //= tp
    attn.register_forward_hook(_all_reduce_output(group))


def apply_tensor_parallel(model: MoETransformer, group: dist.ProcessGroup, tp: int,
                          tp_rank: int) -> MoETransformer:
    cfg = model.cfg
    hidden = cfg.expert_hidden // tp
    h_slice = slice(tp_rank * hidden, (tp_rank + 1) * hidden)
    for layer in model.layers.values():
        attn = layer.attn
        if isinstance(attn, LatentAttention):
            _split_latent_attention(attn, group, tp, tp_rank)
        else:
            _split_attention(attn, group, tp, tp_rank)
        if layer.mlp is not None:
            mlp = layer.mlp
            mlp.w_gate, mlp.w_up = (_split_linear(lin, 0, tp, tp_rank) for lin in (mlp.w_gate, mlp.w_up))
            mlp.w_down = _split_linear(mlp.w_down, 1, tp, tp_rank)
            mlp.register_forward_hook(_all_reduce_output(group))
            continue

        experts = layer.moe.experts
        for name in ("w_up", "w_gate"):
            if hasattr(experts, name):
                E, H, D = getattr(experts, name).shape
                setattr(experts, name, meta_weight(E, hidden, D))
                mark_shard(experts, name, (E, H, D), (slice(None), h_slice, slice(None)))
        E, D, H = experts.w_down.shape
        experts.w_down = meta_weight(E, D, hidden)
        mark_shard(experts, "w_down", (E, D, H), (slice(None), slice(None), h_slice))
        shared = layer.moe.shared
        if shared is not None:
            shared.w_gate, shared.w_up = (_split_linear(lin, 0, tp, tp_rank) for lin in (shared.w_gate, shared.w_up))
            shared.w_down = _split_linear(shared.w_down, 1, tp, tp_rank)
        layer.moe.reduce_output = functools.partial(dist.all_reduce, group=group)
    return model
