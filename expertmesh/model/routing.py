"""DeepSeek-V3's and DeepSeek-V2's routers: group-limited top-k, scaled weights. Notation: T
tokens, D d_model, E experts in G groups of E / G, k experts per token.

DeepSeek-V3 (`scoring="sigmoid"`, topk_method noaux_tc):
  scores  = sigmoid(x @ weight.T)                   [T, E] fp32
  biased  = scores + bias                           [T, E]  (bias: e_score_correction_bias [E])
  groups  = sum of each group's 2 best biased       [T, G]; keep the `topk_groups` best groups
  ids     = top-k of `biased` within kept groups    [T, k]
  weights = scores[ids] (unbiased), / their sum if `renormalize`, x `scaling`   [T, k]

The bias steers which experts are chosen (DeepSeek's auxiliary-loss-free load balancing) but
never the weight an expert's output gets.

DeepSeek-V2 (`scoring="softmax"`): scores = softmax(x @ weight.T) over all E, no bias, a group's
score is its best expert's (topk_method group_limited_greedy; greedy is G = 1), the rest as above.

Same interface as `moe.Router` (`logits`, `select`,
`forward`), so the MoE block, expert and tensor parallelism use it unchanged (it is replicated).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from expertmesh.model.layers import meta_weight


class GroupLimitedRouter(nn.Module):
    def __init__(self, d_model: int, n_experts: int, top_k: int, renormalize: bool, n_groups: int,
                 topk_groups: int, scaling: float, scoring: str = "sigmoid"):
        super().__init__()
        self.top_k, self.renormalize, self.scaling = top_k, renormalize, scaling
        self.n_groups, self.topk_groups, self.sigmoid = n_groups, topk_groups, scoring == "sigmoid"
        self.weight = meta_weight(n_experts, d_model)
        if self.sigmoid:
            self.bias = meta_weight(n_experts)

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        """x `[T, D]` -> sigmoid or softmax scores `[T, E]` (fp32): what `select` takes, under the
        name the MoE block asks every router for (`moe.Router.logits`)."""
        logits = F.linear(x, self.weight).float()
        return logits.sigmoid() if self.sigmoid else logits.softmax(dim=-1)

    def select(self, probs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """scores `[T, E]` -> ids `[T, k]`, weights `[T, k]` (fp32)."""
        T, E = probs.shape
        biased = probs + self.bias.float() if self.sigmoid else probs
        grouped = biased.view(T, self.n_groups, E // self.n_groups)
        groups = grouped.topk(2, dim=-1).values.sum(-1) if self.sigmoid else grouped.amax(-1)
        kept = torch.zeros_like(groups, dtype=torch.bool).scatter_(
            1, groups.topk(self.topk_groups, dim=-1).indices, True)
        allowed = kept.repeat_interleave(E // self.n_groups, dim=1)
        ids = biased.masked_fill(~allowed, float("-inf")).topk(self.top_k, dim=-1).indices
        weights = probs.gather(1, ids)
        if self.renormalize:
            weights = weights / (weights.sum(dim=-1, keepdim=True) + 1e-20)
        return ids, weights * self.scaling

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        ids, weights = self.select(self.logits(x))
        return ids, weights.to(x.dtype)
