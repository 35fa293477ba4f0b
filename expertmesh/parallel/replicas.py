"""Balanced replica routing: which replica of a replicated expert serves each assignment, chosen
per MoE layer call from every rank's counts, so that the ranks compute about as many rows.

A placement with replicas (redundant experts, `placement.py`) fixes each rank's replica of an
expert in a static slot table (its own, else one on its node). That spreads the *average* load,
but a decode step routes few tokens and its per-call imbalance is random: with 2 ranks, 8
experts and 16 assignments the busier rank computes about 1.2x the mean. `BalancedReplicas`
instead, in every layer call:

  1. counts this rank's assignments per expert `[E]`, reads them on the host (one sync per
     call) and all-gathers them over the EP group's gloo twin (E int64 per rank);
  2. every rank runs the same plan (`split_over_replicas`): experts with one holder load their
     rank; then each replicated expert, heaviest first, fills its holders' ranks lowest first
     (water filling); a source's rows of that expert go to its own rank's replica first, then
     to the other holders in rank order. Filling greedily, expert by expert, can load a rank
     that a later expert needed (placement [[0, 2], [1, 0], [2], [3]], rows 2 of expert 0 and
     3 + 3 of experts 1 and 2: 4 rows on the busiest rank where the static table gives 3), so
     the plan is the static split instead whenever that leaves the busiest rank fewer rows;
  3. maps each of this rank's assignments to its slot: its position among this rank's
     assignments of the same expert (token order) against the plan's cumulative rows.

A call of at most `HOST_ASSIGNMENTS` assignments (decode) reads its expert ids instead of its
counts (the same one host read) and counts and maps them in Python: about 15 small device ops
fewer, which on 2 CPU ranks took the call from 1.2-1.3 ms to 0.8-0.85 ms, 0.4 of it the
all-gather (measured ad hoc, medians of 300, 4 tokens x top-2). Larger calls count and map on
the device. Ranks may take different paths in one call: the all-gather is the same.

Every assignment still goes to exactly one holder of its expert, and holders compute the same
function, so outputs equal the static choice's up to the grouping of rows in a matmul.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from expertmesh.model.moe import rank_in_group, sort_assignments
from expertmesh.model.paged import upload
from expertmesh.parallel.mesh import all_gather_flat, host_group
from expertmesh.parallel.placement import Placement, holders, slot_table

HOST_ASSIGNMENTS = 256  # map a call with at most this many assignments in Python, on the host

Split = list[tuple[int, int]]  # (slot, rows), in the order a source's rows fill them


def water_fill(levels: list[int], amount: int) -> list[int]:
    """Add `amount` rows over holders at `levels`, lowest first, so that the highest resulting
    level is as low as it can be: -> rows per holder (integers, summing to `amount`; of equal
    levels, the earlier holders get the extra row)."""
    order = sorted(range(len(levels)), key=lambda i: (levels[i], i))
    filled, level, left = 1, levels[order[0]], amount  # the lowest `filled` holders are at `level`
    while filled < len(order) and (levels[order[filled]] - level) * filled <= left:
        left -= (levels[order[filled]] - level) * filled
        level = levels[order[filled]]
        filled += 1
    rise, extra = divmod(left, filled)
    give = [0] * len(levels)
    for n, i in enumerate(order[:filled]):
        give[i] = level + rise - levels[i] + (1 if n < extra else 0)
    return give


def split_over_replicas(counts: list[list[int]], placement: Placement,
                        static: list[list[int]]) -> list[dict[int, Split]]:
    """counts[p][e]: source rank p's assignments of expert e in this call (every rank's);
    static[p][e]: source p's slot of expert e in the static table (`slot_table`) -> for each
    source p, {replicated expert: [(slot, rows), ...]} (experts with one holder are not listed:
    their slot is fixed). Slots number placement's (rank, local expert) rank by rank. The water
    filling's plan, or the static split where that leaves the busiest rank fewer rows."""
    held = holders(placement)
    P = len(counts)
    total = {e: sum(counts[p][e] for p in range(P)) for e in held}
    load = [0] * len(placement)
    for e, where in held.items():
        if len(where) == 1:
            load[where[0][0]] += total[e]
    replicated = [e for e, where in held.items() if len(where) > 1]
    fixed = [{e: [(static[p][e], counts[p][e])] if counts[p][e] else [] for e in replicated} for p in range(P)]
    filled = _water_filled(counts, held, replicated, total, list(load))
    rank_of = {slot: r for where in held.values() for r, slot in where}
    return min((filled, fixed), key=lambda plans: _busiest(plans, rank_of, load))


def _busiest(plans: list[dict[int, Split]], rank_of: dict[int, int], load: list[int]) -> int:
    """Rows on the busiest rank under `plans`, on top of `load` (the experts with one holder)."""
    rows = list(load)
    for plan in plans:
        for split in plan.values():
            for slot, n in split:
                rows[rank_of[slot]] += n
    return max(rows)


def _water_filled(counts: list[list[int]], held: dict[int, list[tuple[int, int]]], replicated: list[int],
                  total: dict[int, int], load: list[int]) -> list[dict[int, Split]]:
    """Each replicated expert, heaviest first, water-fills its holders' ranks from `load` (rows
    per rank so far, updated in place); a source's rows go to its own replica first."""
    P = len(counts)
    plans: list[dict[int, Split]] = [{} for _ in range(P)]
    for e in sorted(replicated, key=lambda e: (-total[e], e)):
        ranks = [r for r, _ in held[e]]
        give = water_fill([load[r] for r in ranks], total[e])
        room = dict(zip(ranks, give))
        for r, g in room.items():
            load[r] += g
        slot_of = dict(held[e])
        left = [counts[p][e] for p in range(P)]
        for p in range(P):
            plans[p][e] = []
        for p in (p for p in range(P) if p in room):  # a source's own replica first
            _take(plans[p][e], slot_of, room, left, p, p)
        for p in range(P):
            for r in sorted(room):
                _take(plans[p][e], slot_of, room, left, p, r)
    return plans


def _take(split: Split, slot_of: dict[int, int], room: dict[int, int], left: list[int], p: int, r: int):
    n = min(left[p], room[r])
    if n:
        split.append((slot_of[r], n))
        room[r] -= n
        left[p] -= n


class BalancedReplicas:
    """One layer's balanced replica routing (module docstring) for this rank.

    placement: the layer's experts per rank of `group`; peer_nodes: the node of each rank (the
    static tables `slot_table` gives every source; this rank's is kept for experts with one holder).
    """

    def __init__(self, group: dist.ProcessGroup | None, placement: Placement, n_experts: int,
                 rank: int, peer_nodes: list[int]):
        self.placement, self.n_experts, self.rank = placement, n_experts, rank
        self.host_group = host_group(group)  # the counts are all-gathered on the host
        self.n_ranks = len(placement)
        self.static = [slot_table(placement, n_experts, p, peer_nodes).tolist() for p in range(self.n_ranks)]
        self.static_slots = self.static[rank]

    def __call__(self, ids: torch.Tensor) -> torch.Tensor:
        """ids `[T, k]` (-1: dropped) -> slots `[T, k]` (-1 where dropped). Collective; T may
        differ between ranks, and so may the path each takes (the all-gather is the same)."""
        E, flat = self.n_experts, ids.reshape(-1)
        if flat.numel() <= HOST_ASSIGNMENTS:
            experts = flat.tolist()  # the call's one host read
            counts = [0] * E
            for e in experts:
                if e >= 0:
                    counts[e] += 1
            slots = self._walk(experts, self._plan(counts))
            return upload([torch.tensor(slots, dtype=torch.long).view_as(ids)], ids.device)[0]
        key = torch.where(flat >= 0, flat, E)  # dropped assignments count under E, unrouted
        order, counts = sort_assignments(key, E + 1)
        plan = self._plan(counts[:E].tolist())  # the call's one host read
        width = max((len(parts) for parts in plan.values()), default=0) + 1
        never = flat.numel()  # a position no assignment reaches: the last part takes the rest
        ends = [[never] * width for _ in range(E + 1)]
        slots = [[s] * width for s in self.static_slots] + [[-1] * width]
        for e, parts in plan.items():
            end = 0
            for j, (slot, rows) in enumerate(parts):
                end += rows
                ends[e][j], slots[e][j] = end, slot
        ends_t, slots_t = upload([torch.tensor(ends), torch.tensor(slots)], ids.device)
        position = rank_in_group(order, key, counts)  # among this rank's of its expert, token order
        part = (position[:, None] >= ends_t[key]).sum(1)
        return slots_t[key, part].view_as(ids)

    def _plan(self, counts: list[int]) -> dict[int, Split]:
        """This rank's assignments per expert -> its plan, from every rank's counts (all-gathered
        over the group's gloo twin: E int64 per rank)."""
        everyone = torch.empty(self.n_ranks * self.n_experts, dtype=torch.long)
        all_gather_flat(everyone, torch.tensor(counts), group=self.host_group)
        counts = everyone.view(self.n_ranks, -1).tolist()
        return split_over_replicas(counts, self.placement, self.static)[self.rank]

    def _walk(self, experts: list[int], plan: dict[int, Split]) -> list[int]:
        """The slot of each assignment (`experts`, flat, token order) by its position among this
        rank's of its expert against the plan's parts, in Python."""
        taken = [0] * self.n_experts
        slots = []
        for e in experts:
            if e < 0:
                slots.append(-1)
                continue
            slot, position = self.static_slots[e], taken[e]
            taken[e] += 1
            for part_slot, rows in plan.get(e, ()):
                if position < rows:
                    slot = part_slot
                    break
                position -= rows
            slots.append(slot)
        return slots
