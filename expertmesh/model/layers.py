"""Weight-only building blocks, created on the meta device (no init: weights are materialized
later, shard by shard; `nn.Linear`'s own init on meta costs seconds of first-call overhead)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def meta_weight(*shape: int) -> nn.Parameter:
    return nn.Parameter(torch.empty(*shape, device="meta"), requires_grad=False)


class Linear(nn.Module):
    """y = x @ weight.T (+ bias), weight `[out_features, in_features]`, bias `[out_features]`."""

    def __init__(self, in_features: int, out_features: int, bias: bool = False):
        super().__init__()
        self.weight = meta_weight(out_features, in_features)
        self.bias = meta_weight(out_features) if bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight, self.bias)


class Embedding(nn.Module):
    """ids `[...]` -> rows of weight `[vocab, D]`."""

    def __init__(self, vocab: int, dim: int):
        super().__init__()
        self.weight = meta_weight(vocab, dim)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return F.embedding(ids, self.weight)


class RMSNorm(nn.Module):
    """x * rsqrt(mean(x^2) + eps) * weight over the last dim, one fused op (`F.rms_norm`, which
    computes in fp32 for bf16 inputs)."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = meta_weight(dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.rms_norm(x, self.weight.shape, self.weight, self.eps)
