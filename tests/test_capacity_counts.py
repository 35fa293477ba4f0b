"""What capacity counts (model/capacity.py `Overflow`, `capacity_limit`), checked offline against
counts made here by hand: every assignment looked at is counted once, rerouted and dropped ones
by kind, across calls until a reset, and the per-expert limit is ceil(C * T * k / E), at least 1.
`test_load_balance.py` checks which assignments capacity keeps; these are the numbers that
`/metrics` and the run report show."""

import math

import pytest
import torch

from expertmesh.config import Capacity
from expertmesh.model.capacity import DROPPED, KEPT, REROUTED, Overflow, apply_capacity, capacity_limit


@pytest.mark.parametrize("factor, tokens, k, experts", [
    (1.0, 8, 2, 4), (1.0, 7, 2, 4), (0.5, 3, 1, 8), (0.01, 1, 1, 64), (2.0, 10, 3, 6), (1.25, 16, 2, 16),
])
def test_capacity_limit_is_the_ceiling_and_at_least_one(factor, tokens, k, experts):
    want = max(1, math.ceil(factor * tokens * k / experts))
    assert capacity_limit(Capacity(factor, "drop"), tokens, k, experts) == want


def test_overflow_counts_each_kind_across_calls_until_reset():
    counts = Overflow()
    first = torch.tensor([[KEPT, DROPPED], [REROUTED, DROPPED], [KEPT, KEPT]])  # 6 looked at, 1 rerouted, 2 dropped
    second = torch.tensor([[REROUTED, REROUTED, DROPPED]])  # 3, 2, 1
    counts.count(first)
    counts.count(second)
    snap = counts.snapshot()
    assert (snap.assignments, snap.rerouted, snap.dropped) == (9, 3, 3)
    # the snapshot moved the device counts into the host counts: read again, nothing is added twice
    again = counts.snapshot()
    assert (again.assignments, again.rerouted, again.dropped) == (9, 3, 3)
    counts.count(torch.tensor([[DROPPED]]))
    assert (counts.snapshot().assignments, counts.snapshot().dropped) == (10, 4)
    counts.count(torch.tensor([[REROUTED, DROPPED]]))  # counted on the device, not read yet
    counts.reset()  # drops those too
    empty = counts.snapshot()
    assert (empty.assignments, empty.rerouted, empty.dropped) == (0, 0, 0)
    counts.count(torch.tensor([[REROUTED]]))
    assert (counts.snapshot().rerouted, counts.snapshot().assignments) == (1, 1)


def test_counting_reads_nothing_until_the_snapshot():
    counts = Overflow()
    counts.count(torch.tensor([[DROPPED, KEPT]]))
    assert (counts.assignments, counts.rerouted, counts.dropped) == (2, 0, 0)  # dropped still on the device
    assert counts.pending.tolist() == [0, 1]


def test_groups_must_cover_the_call_exactly():
    probs = torch.full((4, 4), 0.25)
    w, ids = probs.topk(2, dim=-1)
    with pytest.raises(ValueError, match="3 tokens for a call of 4"):
        apply_capacity(probs, ids, w, Capacity(1.0, "drop"), [1, 2])
    apply_capacity(probs, ids, w, Capacity(1.0, "drop"), [1, 3])


def test_a_group_exactly_at_its_limit_keeps_everything_untouched():
    # 4 tokens, k 1, E 2, factor 0.5: the limit is 1 per expert, below the group's 4: over
    # factor 2: the limit is 4, equal to the group's size: nothing can be over, all kept, and the
    # ids and weights are returned as they came, neither read nor copied (every decode step)
    probs = torch.tensor([[0.9, 0.1]] * 4)
    w, ids = probs.topk(1, dim=-1)
    got_ids, got_w, status = apply_capacity(probs, ids, w, Capacity(2.0, "drop"))
    assert (status == KEPT).all() and got_ids is ids and got_w is w
    got, _, status = apply_capacity(probs, ids, w, Capacity(0.5, "reroute"))
    assert status.flatten().tolist() == [KEPT, REROUTED, DROPPED, DROPPED]
    assert got.flatten().tolist() == [0, 1, -1, -1]
