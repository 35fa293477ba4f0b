"""Expert capacity and dynamic gating (opt-in; without it every assignment is computed).

The unit of capacity is one sequence's tokens in one forward pass (a capacity group): with
capacity factor C, each expert takes at most ceil(C * T_g * k / E) of the assignments of a group
of T_g tokens. A sequence is never split across ranks or pipeline micro-batches, so every
deployment (EP, TP, PP, micro-batched or not) and the single-device reference see the same groups
and take the same decisions from the same router probabilities, without any collective. Decode
steps (T_g = 1, k distinct experts) never exceed capacity; it bites in prefill.

Inside a group assignments are admitted in token order (a token's k choices best first). An
assignment over capacity is
- `drop`: skipped; its share of the token's output is lost and the residual passes through;
- `reroute`: given, in the same order, to the token's next-best expert (by router probability)
  that still has room in the group and that the token does not use already, with the weight of
  the slot it replaces; dropped if no expert has room.
Every dropped and rerouted assignment is counted.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from expertmesh.config import Capacity
from expertmesh.model.paged import upload

KEPT, REROUTED, DROPPED = 0, 1, 2


@dataclass
class Overflow:
    """What capacity decided over the calls since the last reset: assignments looked at, rerouted
    and dropped (an MoE block's counter of its rank's tokens; `engine/counters.py` resets and reads it).
    The rerouted and dropped counts add up on the device and are read by `snapshot`, once."""

    assignments: int = 0
    rerouted: int = 0
    dropped: int = 0
    pending: torch.Tensor | None = field(default=None, repr=False, compare=False)  # [rerouted, dropped]

    def count(self, status: torch.Tensor) -> None:
        """Add a call's `status` `[T, k]` (KEPT/REROUTED/DROPPED), without reading the device."""
        self.assignments += status.numel()
        counts = torch.stack([(status == REROUTED).sum(), (status == DROPPED).sum()])
        self.pending = counts if self.pending is None else self.pending + counts

    def reset(self) -> None:
        self.assignments = self.rerouted = self.dropped = 0
        self.pending = None

    def snapshot(self) -> "Overflow":
        """A copy with every count on the host (reads the device's counts, a host sync)."""
        if self.pending is not None:
            rerouted, dropped = self.pending.tolist()
            self.rerouted, self.dropped, self.pending = self.rerouted + rerouted, self.dropped + dropped, None
        return Overflow(self.assignments, self.rerouted, self.dropped)


def capacity_limit(capacity: Capacity, tokens: int, top_k: int, n_experts: int) -> int:
    """The most assignments one expert takes from a capacity group of `tokens` tokens."""
    return max(1, math.ceil(capacity.factor * tokens * top_k / n_experts))


def apply_capacity(probs: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor, capacity: Capacity,
                   group_sizes: list[int] | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """probs `[T, E]` (fp32), ids / weights `[T, k]` of T tokens made of consecutive capacity groups
    of `group_sizes` tokens (None: one group) -> ids (-1 where dropped), weights (0 where dropped),
    status `[T, k]` (KEPT/REROUTED/DROPPED)."""
    T, k = ids.shape
    E = probs.shape[1]
    sizes = group_sizes if group_sizes is not None else [T]
    if sum(sizes) != T:
        raise ValueError(f"capacity groups of {sum(sizes)} tokens for a call of {T} tokens")
    limits_h = [capacity_limit(capacity, n, k, E) for n in sizes]
    if all(n <= limit for n, limit in zip(sizes, limits_h)):
        # a token's k experts are distinct, so no expert gets more than n assignments of a group of
        # n tokens: nothing can be over (every decode step), and nothing is read or copied
        return ids, weights, torch.zeros_like(ids)
    limits, sizes_t, first = upload([torch.tensor(limits_h), torch.tensor(sizes),
                                     torch.tensor([0, *sizes[:-1]]).cumsum(0) * k], ids.device)
    group_of = torch.repeat_interleave(torch.arange(len(sizes), device=ids.device), sizes_t * k)  # [T * k]
    flat = ids.reshape(-1)
    hits = F.one_hot(flat, E)
    seen = hits.cumsum(0)  # assignments so far per expert, over the whole call
    before = torch.cat([seen.new_zeros(1, E), seen])[first]  # [groups, E]: counts before each group
    position = ((seen - before[group_of]) * hits).sum(1) - 1  # earlier choices of the expert in the group
    admitted = position < limits[group_of]
    status = torch.where(admitted, KEPT, DROPPED)
    ids, weights = flat, weights.reshape(-1)
    if capacity.policy == "reroute":
        ids, status = _reroute(probs, ids, status, admitted, group_of, limits_h, k)
    dropped = status == DROPPED
    ids = torch.where(dropped, -1, ids)
    weights = torch.where(dropped, 0, weights)
    return ids.view(T, k), weights.view(T, k), status.view(T, k)


def _reroute(probs: torch.Tensor, ids: torch.Tensor, status: torch.Tensor, admitted: torch.Tensor,
             group_of: torch.Tensor, limits: list[int], k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Give each assignment over capacity (`admitted` False), in order, to its token's next-best
    expert with room in its group that the token does not use already; flat ids, status `[T * k]`.
    A greedy walk in order, on the host (prefill only: decode never gets here)."""
    overflow = (~admitted).nonzero().squeeze(1).tolist()
    if not overflow:
        return ids, status
    ids, status = ids.clone(), status.clone()
    E = probs.shape[1]
    used = torch.zeros(len(limits), E, dtype=torch.long).index_put_(
        (group_of[admitted].cpu(), ids[admitted].cpu()), torch.ones((), dtype=torch.long), accumulate=True)
    room = (torch.tensor(limits)[:, None] - used).tolist()
    preference = probs.argsort(dim=1, descending=True).tolist()
    groups = group_of.tolist()
    for a in overflow:
        t, g = a // k, groups[a]
        taken = set(ids[t * k:(t + 1) * k].tolist())
        for e in preference[t]:
            if room[g][e] > 0 and e not in taken:
                ids[a], room[g][e], status[a] = e, room[g][e] - 1, REROUTED
                break
    return ids, status
