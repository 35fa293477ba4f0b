"""Balanced replica routing (`parallel/replicas.py`): each layer call splits replicated experts'
tokens over their holders from every rank's counts. Checked against brute force and naive walks,
and end to end: the reference's tokens, and fewer rows on the busiest rank than the static choice."""

import functools
import itertools

import pytest
import torch
import torch.distributed as dist
from hypothesis import example, given, settings
from hypothesis import strategies as st

from expertmesh.config import Workload, preset
from expertmesh.deployment import Deployment
from expertmesh.engine.spec import RunSpec
from expertmesh.engine.worker import run
from expertmesh.launch import launch
from expertmesh.parallel.placement import contiguous_placement, plan_redundant, slot_table
from expertmesh.parallel.replicas import HOST_ASSIGNMENTS, BalancedReplicas, split_over_replicas, water_fill


@settings(max_examples=200, deadline=None)
@given(levels=st.lists(st.integers(0, 9), min_size=1, max_size=4), amount=st.integers(0, 12))
def test_water_fill_reaches_the_lowest_possible_peak(levels, amount):
    give = water_fill(levels, amount)
    assert sum(give) == amount and min(give) >= 0
    best = min(max(l + g for l, g in zip(levels, c))
               for c in itertools.product(range(amount + 1), repeat=len(levels)) if sum(c) == amount)
    assert max(l + g for l, g in zip(levels, give)) == best


@st.composite
def layer_call(draw):
    """(placement with replicas, counts[source][expert]) for P ranks and E experts."""
    P = draw(st.sampled_from([2, 3, 4]))
    E = P * draw(st.integers(1, 3))
    placement = contiguous_placement(E, P)
    for r in range(P):
        extra = draw(st.lists(st.integers(0, E - 1), max_size=3, unique=True))
        placement[r] += [e for e in extra if e not in placement[r]]
    counts = draw(st.lists(st.lists(st.integers(0, 6), min_size=E, max_size=E), min_size=P, max_size=P))
    return placement, counts


def rank_rows(placement, rows_per_slot):
    sizes = [len(x) for x in placement]
    starts = [sum(sizes[:r]) for r in range(len(placement))]
    return [sum(rows_per_slot[starts[r]:starts[r] + sizes[r]]) for r in range(len(placement))]


@settings(max_examples=200, deadline=None)
@given(call=layer_call())
# water filling expert 2 first puts 2 of its 3 rows on rank 0, which expert 0 then needs: 4 rows
# on rank 0 where the static table's busiest rank has 3 (found by hypothesis 6.170)
@example(call=([[0, 2], [1, 0], [2], [3]], [[0, 0, 0, 0], [0, 0, 0, 0], [2, 0, 0, 0], [0, 3, 3, 0]]))
def test_every_row_goes_to_a_holder_once_and_the_busiest_rank_never_gains(call):
    placement, counts = call
    P, E = len(counts), len(counts[0])
    static_tables = [slot_table(placement, E, p).tolist() for p in range(P)]
    n_slots = sum(map(len, placement))
    holder_slots = {}
    slot = 0
    for experts in placement:
        for e in experts:
            holder_slots.setdefault(e, set()).add(slot)
            slot += 1
    plans = split_over_replicas(counts, placement, static_tables)
    balanced, static = [0] * n_slots, [0] * n_slots
    for p in range(P):
        table = static_tables[p]
        for e in range(E):
            static[table[e]] += counts[p][e]
            parts = plans[p].get(e)
            assert (parts is None) == (len(holder_slots[e]) == 1)  # replicated experts only
            if parts is None:
                parts = [(table[e], counts[p][e])]
            else:
                assert all(s in holder_slots[e] and n > 0 for s, n in parts)
            for s, n in parts:
                balanced[s] += n
            assert sum(n for _, n in parts) == counts[p][e]
    assert max(rank_rows(placement, balanced)) <= max(rank_rows(placement, static))


def _map_on_ranks(placement, E, T, k, seed, device):
    """This rank's slots from BalancedReplicas against a naive walk of its plan: (equal, same shape)."""
    rank, P = dist.get_rank(), dist.get_world_size()
    gen = torch.Generator().manual_seed(seed + rank)
    ids = torch.stack([torch.randperm(E, generator=gen)[:k] for _ in range(T)])
    ids[torch.rand(T, k, generator=gen) < 0.1] = -1  # some dropped by capacity
    table = slot_table(placement, E, rank)
    got = BalancedReplicas(dist.group.WORLD, placement, E, rank, [0] * P)(ids)
    counts = [None] * P
    dist.all_gather_object(counts, [int((ids == e).sum()) for e in range(E)])
    plan = split_over_replicas(counts, placement, [slot_table(placement, E, p).tolist() for p in range(P)])[rank]
    taken = {e: 0 for e in range(E)}
    want = []
    for e in ids.reshape(-1).tolist():  # token order, a token's k choices in order
        if e < 0:
            want.append(-1)
            continue
        position, slot = taken[e], int(table[e])
        taken[e] += 1
        for s, n in plan.get(e, []):
            if position < n:
                slot = s
                break
            position -= n
        want.append(slot)
    return got.reshape(-1).tolist() == want, got.shape == ids.shape


@pytest.mark.parametrize("P, placement", [
    (2, [[0, 1, 2, 3, 4], [4, 5, 6, 7, 0]]),
    (4, [[0, 1, 5], [2, 3, 5], [4, 5, 0], [6, 7, 0]]),
])
@pytest.mark.parametrize("tokens", [(24, 24), (HOST_ASSIGNMENTS, HOST_ASSIGNMENTS), (24, HOST_ASSIGNMENTS)],
                         ids=["on-host", "on-device", "both"])  # per even / odd rank, x top-2
def test_each_assignment_takes_the_slot_its_plan_gives_in_token_order(P, placement, tokens):
    assert launch(functools.partial(_gathered, placement, tokens), P, timeout=60) == [(True, True)] * P


def _gathered(placement, tokens, device):
    """Every rank's (same slots as the naive walk, same shape as ids)."""
    everyone = [None] * dist.get_world_size()
    T = tokens[dist.get_rank() % 2]
    dist.all_gather_object(everyone, _map_on_ranks(placement, 8, T, 2, 5, device))
    return everyone


SKEWED = preset("tiny", router_skew=1.2)


def _run(deployment, **kw):
    workload = Workload(batch_size=16, prompt_len=12, gen_len=4, seed=1)
    return run(RunSpec(SKEWED, Deployment.parse(deployment), workload, seed=4, record_logits=True, **kw),
               timeout=120)


@pytest.mark.parametrize("deployment, redundant, low_latency", [("ep2", 2, 64), ("ep4", 3, 0)])
def test_balanced_replica_routing_gives_the_reference_tokens_with_less_imbalance(deployment, redundant,
                                                                                 low_latency):
    """Decode steps through the low-latency exchange (ep2) or the standard one (ep4)."""
    ep = Deployment.parse(deployment).ep
    loads = [100 / (e + 1) ** 1.2 for e in range(SKEWED.n_experts)]
    placement = [plan_redundant(loads, ep, redundant) for _ in range(SKEWED.n_layers)]
    ref = _run("single")
    local = _run(deployment, placement=placement, low_latency_tokens=low_latency)
    balanced = _run(deployment, placement=placement, replica_routing="balanced",
                    low_latency_tokens=low_latency)
    assert torch.equal(balanced.tokens, ref.tokens)
    assert (balanced.logits - ref.logits).abs().max() < 1e-4
    assert sum(balanced.load["tokens_per_rank"]) == sum(local.load["tokens_per_rank"])
    assert balanced.load["imbalance_mean"] < local.load["imbalance_mean"]
