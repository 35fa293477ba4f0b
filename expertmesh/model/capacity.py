"""Expert capacity and dynamic gating (opt-in; without it every assignment is computed).

With capacity factor C, each expert takes at most ceil(C * T * k / E) assignments per MoE call,
where T counts every token of the call across the EP group. Assignments are admitted in global
token order (sequence by sequence, position by position; a token's k choices best first), so
every rank, and the single-device reference, takes the same decisions from the same router
probabilities. An assignment over capacity is
- `drop`: skipped; its share of the token's output is lost and the residual passes through;
- `reroute`: given, in the same global order, to the token's next-best expert (by router
  probability) that still has room and that the token does not use already, with the weight of
  the slot it replaces; dropped if no expert has room.
Every dropped and rerouted assignment is counted.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

POLICIES = ("drop", "reroute")
KEPT, REROUTED, DROPPED = 0, 1, 2


@dataclass(frozen=True)
class Capacity:
    factor: float
    policy: str = "drop"

    def __post_init__(self) -> None:
        if not self.factor > 0:
            raise ValueError(f"capacity factor {self.factor} must be > 0 (omit it for no capacity)")
        if self.policy not in POLICIES:
            raise ValueError(f"overflow policy {self.policy!r}; use one of: {', '.join(POLICIES)}")

    def limit(self, tokens: int, top_k: int, n_experts: int) -> int:
        return max(1, math.ceil(self.factor * tokens * top_k / n_experts))


def apply_capacity(probs: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor,
                   capacity: Capacity) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """probs `[T, E]` (fp32), ids / weights `[T, k]` of every token of the call, in global order
    -> ids (-1 where dropped), weights (0 where dropped), status `[T, k]` (KEPT/REROUTED/DROPPED)."""
    T, k = ids.shape
    E = probs.shape[1]
    limit = capacity.limit(T, k, E)
    flat = ids.reshape(-1)
    hits = F.one_hot(flat, E)
    position = (hits.cumsum(0) * hits).sum(1) - 1  # how many earlier assignments chose the expert
    admitted = position < limit
    status = torch.where(admitted, KEPT, DROPPED)
    ids, weights = flat.clone(), weights.reshape(-1).clone()
    overflow = (~admitted).nonzero().squeeze(1).tolist()
    if capacity.policy == "reroute" and overflow:
        room = (limit - torch.bincount(flat[admitted], minlength=E)).tolist()
        preference = probs.argsort(dim=1, descending=True).tolist()
        for a in overflow:
            t = a // k
            taken = set(ids[t * k:(t + 1) * k].tolist())
            for e in preference[t]:
                if room[e] > 0 and e not in taken:
                    ids[a], room[e], status[a] = e, room[e] - 1, REROUTED
                    break
    dropped = status == DROPPED
    ids[dropped] = -1
    weights[dropped] = 0
    return ids.view(T, k), weights.view(T, k), status.view(T, k)
