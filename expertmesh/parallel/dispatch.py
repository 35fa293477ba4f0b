"""Expert-parallel token exchange: send each (token, expert) assignment to the rank holding the
expert, compute there, send the result back.

Notation: T tokens on this rank, k experts per token, N = T * k assignments, D d_model,
P ranks in the EP group, El experts per rank, R assignments received by this rank.

The pipeline of one MoE layer on one rank:

  1. slots = slot_of_expert[ids]            [T, k]  slot = owner rank * El + local expert index
  2. order, counts = sort by slot           [N], [P * El]
  3. all_to_all_single(counts)              P * El int64 each way; the host waits here, because
                                            the token exchange needs its split sizes as ints
  4. all_to_all_single(x[order // k])       sends N x D, receives R x D (uneven splits)
  5. regroup the R rows by local expert, grouped expert compute, ungroup
  6. all_to_all_single(results)             the reverse of 4: sends R x D, receives N x D
  7. combine(results, order, weights)       un-permute, weighted sum of each token's k outputs

Every rank runs all steps for every layer, also with T = 0 or R = 0, so the collectives match.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from expertmesh.model.moe import GroupedExperts, combine, sort_assignments


def slot_table(placement: list[list[int]], n_experts: int) -> torch.Tensor:
    """placement[r] = the experts rank r holds, in local order -> slot of each expert `[E]`."""
    n_local = len(placement[0])
    slots = torch.full((n_experts,), -1, dtype=torch.long)
    for rank, experts in enumerate(placement):
        for local, expert in enumerate(experts):
            slots[expert] = rank * n_local + local
    return slots


def contiguous_placement(n_experts: int, ep: int) -> list[list[int]]:
    """Rank r holds experts r*E/P .. (r+1)*E/P - 1."""
    per = n_experts // ep
    return [list(range(r * per, (r + 1) * per)) for r in range(ep)]


class AllToAllDispatcher:
    """The EP step of an MoE block (replaces `LocalDispatcher`); see the module docstring."""

    def __init__(self, group: dist.ProcessGroup, placement: list[list[int]], n_experts: int):
        self.group = group
        self.ep = len(placement)
        self.n_local = len(placement[0])
        self.slots = slot_table(placement, n_experts)

    def __call__(self, x: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor,
                 experts: GroupedExperts) -> torch.Tensor:
        k = ids.shape[1]
        order, counts = sort_assignments(self.slots.to(ids.device)[ids], self.ep * self.n_local)
        recv_counts = torch.empty_like(counts)
        dist.all_to_all_single(recv_counts, counts, group=self.group)
        send_splits = counts.view(self.ep, self.n_local).sum(1).tolist()
        recv_matrix = recv_counts.view(self.ep, self.n_local)  # [source rank, local expert]
        recv_splits = recv_matrix.sum(1).tolist()

        received = self._exchange(x[order // k], recv_splits, send_splits)
        regroup, per_expert = _group_by_local_expert(recv_matrix)
        computed = experts(received[regroup], per_expert)
        results = torch.empty_like(computed)
        results[regroup] = computed
        returned = self._exchange(results, send_splits, recv_splits)
        return combine(returned, order, weights)

    def _exchange(self, rows: torch.Tensor, out_splits: list[int], in_splits: list[int]) -> torch.Tensor:
        out = rows.new_empty(sum(out_splits), rows.shape[1])
        dist.all_to_all_single(out, rows.contiguous(), out_splits, in_splits, group=self.group)
        return out


def _group_by_local_expert(recv_matrix: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows received source-major (`recv_matrix [P, El]` counts) -> order grouping them by local
    expert `[R]`, and the count per local expert `[El]`."""
    P, El = recv_matrix.shape
    local_expert = torch.arange(P * El, device=recv_matrix.device) % El
    expert_of_row = torch.repeat_interleave(local_expert, recv_matrix.reshape(-1))
    return torch.argsort(expert_of_row, stable=True), recv_matrix.sum(0)
