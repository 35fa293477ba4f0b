"""The dense feed-forward of a layer without experts (Qwen3-MoE's `mlp_only_layers`):
x `[..., D]` -> down(silu(gate(x)) * up(x)) `[..., D]`, hidden F.

Every token passes through it, so under expert parallelism it is data-parallel like attention
(replicated, each rank computes its own tokens; nothing crosses the network); tensor
parallelism splits F (gate and up column parallel, down row parallel) and all-reduces the output.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from expertmesh.model.layers import Linear


class DenseMLP(nn.Module):
    def __init__(self, d_model: int, hidden: int):
        super().__init__()
        self.w_gate = Linear(d_model, hidden)
        self.w_up = Linear(d_model, hidden)
        self.w_down = Linear(hidden, d_model)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w_down(F.silu(self.w_gate(x)) * self.w_up(x))
