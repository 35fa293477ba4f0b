"""Load balancing: capacity with drop / reroute, redundant experts, load statistics, skew."""

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from expertmesh.config import Capacity, Workload, preset
from expertmesh.deployment import Deployment
from expertmesh.engine.load import load_summary
from expertmesh.engine.spec import RunSpec
from expertmesh.engine.worker import run
from expertmesh.launch import launch
from expertmesh.model.capacity import DROPPED, KEPT, REROUTED, apply_capacity
from expertmesh.parallel.placement import contiguous_placement, slot_table
from expertmesh.parallel.placement import (contiguous_plus_replicas, plan_redundant, planned_rank_loads,
                                           replicate_then_pack)


def naive_capacity(probs, k, factor, policy):
    """Token by token, choice by choice, over one capacity group: the policy as the docs state it."""
    T, E = len(probs), len(probs[0])
    limit = max(1, math.ceil(factor * T * k / E))
    order = [sorted(range(E), key=lambda e: -probs[t][e]) for t in range(T)]
    ids = [row[:k] for row in order]
    used = [0] * E
    status = [[KEPT] * k for _ in range(T)]
    for t in range(T):
        for j in range(k):
            if used[ids[t][j]] < limit:
                used[ids[t][j]] += 1
            else:
                status[t][j] = DROPPED
    if policy == "reroute":
        for t in range(T):
            for j in range(k):
                if status[t][j] != DROPPED:
                    continue
                for e in order[t]:
                    if used[e] < limit and e not in ids[t]:
                        ids[t][j], used[e], status[t][j] = e, used[e] + 1, REROUTED
                        break
    return [[-1 if s == DROPPED else e for e, s in zip(i, st_)] for i, st_ in zip(ids, status)], status


@settings(max_examples=60, deadline=None)
@given(sizes=st.lists(st.integers(1, 15), min_size=1, max_size=4), E=st.integers(2, 8),
       k=st.integers(1, 2), factor=st.floats(0.1, 2.0), policy=st.sampled_from(["drop", "reroute"]),
       one_expert=st.booleans(), seed=st.integers(0, 999))
def test_capacity_accounts_for_every_assignment(sizes, E, k, factor, policy, one_expert, seed):
    """Capacity groups (sequences) are decided independently, each as the naive policy says."""
    T = sum(sizes)
    gen = torch.Generator().manual_seed(seed)
    logits = torch.randn(T, E, generator=gen)
    if one_expert:
        logits[:, 0] += 50  # every token's first choice is expert 0
    probs = logits.softmax(-1)
    w, ids = probs.topk(k, dim=-1)
    got_ids, got_w, status = apply_capacity(probs, ids, w, Capacity(factor, policy), sizes)
    starts = [sum(sizes[:g]) for g in range(len(sizes))]
    for start, n in zip(starts, sizes):
        want_ids, want_status = naive_capacity(probs[start:start + n].tolist(), k, factor, policy)
        assert got_ids[start:start + n].tolist() == want_ids
        assert status[start:start + n].tolist() == want_status
        # each expert takes at most its capacity in each group
        computed = got_ids[start:start + n]
        limit = max(1, math.ceil(factor * n * k / E))
        assert torch.bincount(computed[computed >= 0], minlength=E).max() <= limit
    # conservation: each assignment is computed once (kept or rerouted) or counted as dropped
    assert int((status == KEPT).sum() + (status == REROUTED).sum() + (status == DROPPED).sum()) == T * k
    assert int((got_ids >= 0).sum()) == int((status != DROPPED).sum())
    assert torch.equal(got_w[status == DROPPED], torch.zeros(int((status == DROPPED).sum())))
    assert torch.equal(got_w[status != DROPPED], w[status != DROPPED])  # a slot keeps its weight
    if policy == "drop":
        assert not (status == REROUTED).any()


def test_a_decode_token_never_exceeds_capacity():
    """One token per group: its k distinct experts each have room for at least one assignment."""
    probs = torch.tensor([[0.7, 0.2, 0.05, 0.05]] * 6)
    w, ids = probs.topk(2, dim=-1)
    got_ids, _, status = apply_capacity(probs, ids, w, Capacity(0.1, "drop"), [1] * 6)
    assert torch.equal(got_ids, ids) and (status == KEPT).all()
    _, _, status = apply_capacity(probs, ids, w, Capacity(0.1, "drop"))  # one group of 6: drops
    assert (status == DROPPED).any()


def _run(deployment, cfg, **kw):
    workload = Workload(batch_size=16, prompt_len=12, gen_len=4, seed=1)
    return run(RunSpec(cfg, Deployment.parse(deployment), workload, seed=4, record_logits=True, **kw),
               timeout=120)


SKEWED = preset("tiny", router_skew=1.2)


@pytest.mark.parametrize("policy, factor", [("reroute", 1.0), ("drop", 0.5)])
@pytest.mark.parametrize("deployment, micro", [
    ("ep2", None), ("ep4", None), ("ep16", None), ("tp2", None), ("pp2", None), ("pp2", 1),
    ("ep2pp2", None), ("tp2pp2", 4),
])
def test_capacity_gives_the_reference_outputs_on_every_deployment(policy, factor, deployment, micro):
    """Capacity is decided per sequence, so micro-batches, EP ranks and TP shards see the same
    groups as the single-device reference: same tokens, same logits, same counts."""
    cfg = SKEWED.with_(capacity_factor=factor, overflow=policy)
    ref, result = _run("single", cfg), _run(deployment, cfg, n_micro=micro)
    assert torch.equal(result.tokens, ref.tokens)
    assert (result.logits - ref.logits).abs().max() < 1e-4
    counted = "rerouted" if policy == "reroute" else "dropped"
    assert result.overflow == ref.overflow and ref.overflow[counted] > 0


def test_dropping_changes_outputs_and_is_counted():
    ref = _run("single", SKEWED)
    dropped = _run("ep4", SKEWED.with_(capacity_factor=0.5, overflow="drop"))
    assert dropped.overflow["dropped"] > 0 and dropped.overflow["rerouted"] == 0
    assert not torch.equal(dropped.logits, ref.logits)


@pytest.mark.parametrize("deployment, redundant", [("ep2", 2), ("ep4", 3), ("ep16", 4)])
def test_redundant_experts_change_loads_not_outputs(deployment, redundant):
    ep = Deployment.parse(deployment).ep
    loads = [100 / (e + 1) ** 1.2 for e in range(16)]
    placement = [plan_redundant(loads, ep, redundant) for _ in range(SKEWED.n_layers)]
    assert sum(len(x) for x in placement[0]) > 16  # replicas are really there
    ref = _run("single", SKEWED)
    plain = _run(deployment, SKEWED)
    replicated = _run(deployment, SKEWED, placement=placement)
    assert torch.equal(replicated.tokens, ref.tokens)
    assert (replicated.logits - ref.logits).abs().max() < 1e-4
    assert replicated.load["imbalance_mean"] < plain.load["imbalance_mean"]
    assert sum(replicated.load["tokens_per_expert"][0]) == sum(plain.load["tokens_per_expert"][0])


@settings(max_examples=50, deadline=None)
@given(loads=st.lists(st.floats(0, 1000), min_size=4, max_size=16), ep=st.sampled_from([2, 4]),
       redundant=st.integers(0, 6))
def test_planner_never_raises_the_busiest_rank(loads, ep, redundant):
    E = len(loads) - len(loads) % ep
    loads = loads[:E]
    plan = plan_redundant(loads, ep, redundant)
    default = max(planned_rank_loads(contiguous_placement(E, ep), loads))
    assert max(planned_rank_loads(plan, loads)) <= default + 1e-9
    assert {e for x in plan for e in x} == set(range(E))
    assert all(len(set(x)) == len(x) for x in plan)
    assert sum(len(x) for x in plan) <= E + redundant


def test_the_plan_is_the_packed_candidate_when_the_contiguous_ranks_are_lopsided():
    """Loads 10, 9, 1, 1 on ep2, no spare slot. Packed heaviest first, each onto the less loaded
    rank: 10 -> rank 0, 9 -> rank 1, then a 1 to rank 1 (9 < 10) and the last 1 to rank 0, the only
    one with room: [[0, 2], [1, 3]], busiest rank 11. Contiguous: [[0, 1], [2, 3]], busiest 19."""
    loads = [10, 9, 1, 1]
    assert replicate_then_pack(loads, 2, 0) == [[0, 2], [1, 3]]
    assert contiguous_plus_replicas(loads, 2, 0) == [[0, 1], [2, 3]]
    assert plan_redundant(loads, 2, 0) == [[0, 2], [1, 3]]


def test_the_plan_is_the_contiguous_candidate_when_its_replica_helps_more():
    """Loads 10, 9, 1, 1 on ep2, one spare slot (ranks hold 3 and 2 slots). Packed: expert 0 gets
    the replica, its halves of 5 on ranks 0 and 1; 9 -> rank 0 (a tie on load, and rank 0 has more
    room), 1 -> rank 1, the last 1 -> rank 0, the only one with room: [[0, 1, 2], [0, 3]], busiest
    5 + 9 + 1 = 15. Contiguous plus the best replica: expert 0 on rank 1 leaves rank 0 with
    5 + 9 = 14 and rank 1 with 1 + 1 + 5 = 7: [[0, 1], [2, 3, 0]], busiest 14."""
    loads = [10, 9, 1, 1]
    assert replicate_then_pack(loads, 2, 1) == [[0, 1, 2], [0, 3]]
    assert contiguous_plus_replicas(loads, 2, 1) == [[0, 1], [2, 3, 0]]
    assert plan_redundant(loads, 2, 1) == [[0, 1], [2, 3, 0]]


def test_the_contiguous_candidate_adds_no_replica_that_does_not_help_and_wins_a_tie():
    """Loads 0, 1, 0, 1 on ep2, one spare slot: the contiguous ranks carry 1 each; a replica of
    expert 1 or 3 leaves the rank holding the other at 1.5 and one of the idle experts 0 and 2
    lowers nothing, so none is added. Packing replicates expert 1 and ends at 1.5 (rank 0: 0.5 of
    expert 1 and all of 3). Loads 1, 1, 1, 1, no spare slot: packing gives [[1, 3], [0, 2]] (an
    equal load goes to the rank with more room, then to the lower rank), busiest 2 like the
    contiguous placement's, which the plan keeps; with loads 0, 0, 0, 0 the packing is the same,
    the rank with more room taking each next expert."""
    assert contiguous_plus_replicas([0, 1, 0, 1], 2, 1) == [[0, 1], [2, 3]]
    assert replicate_then_pack([0, 1, 0, 1], 2, 1) == [[0, 1, 3], [1, 2]]
    assert plan_redundant([0, 1, 0, 1], 2, 1) == [[0, 1], [2, 3]]
    assert replicate_then_pack([1, 1, 1, 1], 2, 0) == [[1, 3], [0, 2]]
    assert plan_redundant([1, 1, 1, 1], 2, 0) == [[0, 1], [2, 3]]
    assert replicate_then_pack([0, 0, 0, 0], 2, 0) == [[1, 3], [0, 2]]


def test_planner_lowers_the_busiest_rank_on_zipf_loads():
    loads = [100 / (e + 1) ** 1.2 for e in range(16)]
    default = max(planned_rank_loads(contiguous_placement(16, 16), loads))
    planned = [max(planned_rank_loads(plan_redundant(loads, 16, r), loads)) for r in (1, 2, 4)]
    assert planned[0] < default and planned[2] <= planned[1] <= planned[0]


def test_replicas_serve_the_source_rank_then_its_node_then_spread():
    placement = [[0, 1], [2, 0], [3], [1]]  # expert 0 on ranks 0 and 1, expert 1 on ranks 0 and 3
    nodes = [0, 0, 1, 1]
    # slots: rank0 -> 0, 1; rank1 -> 2, 3; rank2 -> 4; rank3 -> 5
    assert slot_table(placement, 4, 1, nodes).tolist() == [3, 1, 2, 4]   # expert 0 from rank 1 itself
    assert slot_table(placement, 4, 2, nodes).tolist() == [0, 5, 2, 4]   # expert 1 on node 1 (rank 3)
    assert slot_table(placement, 4, 3, nodes)[0] == 3  # no local replica of 0: 3 % 2 -> rank 1's


def test_load_summary_arithmetic():
    per_layer = {0: {0: [[6, 2], [1, 1]], 1: [[2], [0]]}}  # two calls; rank 1 holds one slot
    placement = [[[0, 1], [2]]]
    s = load_summary(per_layer, placement, 3)
    assert s["imbalance_per_layer"][0] == pytest.approx(((8 / 5) + (2 / 1)) / 2)
    assert s["imbalance_max"] == pytest.approx(2.0)
    assert s["tokens_per_rank"] == [10, 2] and s["tokens_per_expert"][0] == [7, 3, 2]


def test_router_skew_biases_popularity_as_zipf():
    from expertmesh.model.moe import Router
    r = Router(4, 4, 1, True, skew=1.0)
    r.weight = torch.nn.Parameter(torch.zeros(4, 4), requires_grad=False)
    probs = r.probs(torch.ones(1, 4))[0]
    assert torch.allclose(probs, torch.tensor([1, 1 / 2, 1 / 3, 1 / 4]) / (1 + 1 / 2 + 1 / 3 + 1 / 4))


def _rebalance_between_batches(device) -> dict:
    """Batch, rebalance from the loads it measured, same batch again: same tokens, less imbalance."""
    from expertmesh.engine import counters
    from expertmesh.engine.engine import Engine
    from expertmesh.engine.serve import serve
    from expertmesh.engine.shard import shard_model
    from expertmesh.engine.worker import static_engine, static_requests
    from expertmesh.model.synthetic import materialize
    from expertmesh.parallel.expert import rebalance
    import torch.distributed as dist

    spec = RunSpec(SKEWED, Deployment.parse("ep4"), Workload(batch_size=8, prompt_len=12, gen_len=3, seed=2))
    rank = dist.get_rank()
    model = materialize(shard_model(spec, rank, dist.group.WORLD), 0, torch.float32)

    def batch():
        counters.reset(model)
        requests = static_requests(spec.workload, spec.cfg)
        engine = Engine(model, spec.cfg, spec.deployment, static_engine(requests, spec.deployment), rank)
        transcript = serve(engine, [(0, r) for r in requests])
        counted = counters.snapshot(model, rank)
        worst = max(max(sum(call) for call in stats.loads) for stats in counted.exchange.values())
        peak = torch.tensor(float(worst))
        dist.all_reduce(peak, op=dist.ReduceOp.MAX)
        return transcript.tokens if rank == 0 else None, peak.item(), counted

    before, peak_before, counted = batch()
    loads = torch.zeros(SKEWED.n_layers, 16)
    for layer, stats in counted.exchange.items():
        for slot, expert in enumerate(counted.placement[layer][rank]):
            loads[layer, expert] += sum(call[slot] for call in stats.loads)
    dist.all_reduce(loads)
    placements = [plan_redundant(loads[i].tolist(), 4, 4) for i in range(SKEWED.n_layers)]
    received = rebalance(model, placements)
    after, peak_after, _ = batch()
    total = torch.tensor(received)
    dist.all_reduce(total)
    slots = sum(len(x) for x in placements[0])
    return {"same": before == after, "peak_before": peak_before, "peak_after": peak_after,
            "received": int(total), "new_slots": slots - 16}


def test_rebalance_moves_weights_between_batches_without_a_restart():
    r = launch(_rebalance_between_batches, 4, timeout=120)
    assert r["same"]
    assert r["peak_after"] < r["peak_before"]
    expert_bytes = 2 * SKEWED.d_model * SKEWED.expert_hidden * 4  # mlp: up and down, fp32
    # every new slot's weights arrived; experts that moved add more, never fewer
    assert r["received"] >= r["new_slots"] * expert_bytes * SKEWED.n_layers > 0
