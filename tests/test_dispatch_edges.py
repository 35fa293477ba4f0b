"""The expert-parallel dispatcher (parallel/dispatch.py) where `test_dispatch.py` does not look, on
4 local gloo ranks: assignments dropped by capacity (id -1) on every exchange path, the routing
record, and the per-call loads and rows sent, each against a count made here from every rank's
routing."""

import functools
from collections import Counter

import torch
import torch.distributed as dist

from expertmesh.launch import launch
from expertmesh.model.forward_context import forward_context
from expertmesh.model.moe import GroupedExperts
from expertmesh.model.synthetic import mark_shard, materialize
from expertmesh.parallel.dispatch import AllToAllDispatcher
from expertmesh.parallel.placement import contiguous_placement

E, D, H, K, EP = 8, 16, 32, 2, 4
TOKENS_PER_RANK = [6, 4, 0, 5]
NODES = [0, 0, 1, 1]


def _ids(rank: int) -> torch.Tensor:
    """Random distinct experts per token, then about a third of the assignments dropped (-1),
    and on rank 0 a token with both dropped."""
    T = TOKENS_PER_RANK[rank]
    gen = torch.Generator().manual_seed(50 + rank)
    ids = torch.rand(T, E, generator=gen).argsort(dim=1)[:, :K]
    ids[torch.rand(T, K, generator=gen) < 0.35] = -1
    if rank == 0:
        ids[1] = -1
    return ids


def _edges(device) -> list[float]:
    rank = dist.get_rank()
    T = TOKENS_PER_RANK[rank]
    gen = torch.Generator().manual_seed(rank)
    x, ids, weights = torch.randn(T, D, generator=gen), _ids(rank), torch.rand(T, K, generator=gen)
    placement = contiguous_placement(E, EP)
    full = materialize(GroupedExperts(E, D, H, "mlp"), seed=7, dtype=torch.float32)
    local = _local_experts(placement[rank])

    expected = torch.zeros(T, D)  # naive: each kept assignment of each token, one by one
    for t in range(T):
        for j in range(K):
            e = int(ids[t, j])
            if e >= 0:
                expected[t] += weights[t, j] * (torch.nn.functional.gelu(x[t] @ full.w_up[e].T) @ full.w_down[e].T)

    everyone = [None] * EP
    dist.all_gather_object(everyone, ids.tolist())
    all_rows = [row for ids_of in everyone for row in ids_of]
    kept = [e for row in all_rows for e in row if e >= 0]
    routed_here = [kept.count(e) for e in placement[rank]]  # rows this rank's experts compute

    worst = []
    bound = max(TOKENS_PER_RANK)
    for kw, low_latency in [(dict(chunks=1), None), (dict(chunks=3), None), (dict(), None),
                            (dict(peer_nodes=NODES, hierarchical=True), None),
                            (dict(peer_nodes=NODES, hierarchical=True, chunks=2), None),
                            (dict(hierarchical=True), None),  # one node: nothing to relay, the flat path
                            (dict(peer_nodes=NODES), bound)]:
        d = AllToAllDispatcher(dist.group.WORLD, placement, E, rank, overlap_chunks=False, **kw)
        with forward_context(low_latency):
            out = d(x, ids, weights, local)
        worst.append((out - expected).abs().max().item() if T else 0.0)
    # a replica of expert 2r + 2 on every rank r, each copy chosen per call by balanced routing
    replicated = [[*experts, (experts[-1] + 1) % E] for experts in placement]
    for low_latency in (None, bound):
        d = AllToAllDispatcher(dist.group.WORLD, replicated, E, rank, replica_routing="balanced")
        with forward_context(low_latency):
            out = d(x, ids, weights, _local_experts(replicated[rank]))
        worst.append((out - expected).abs().max().item() if T else 0.0)

    # two calls: every token, then each rank's first token alone
    d = AllToAllDispatcher(dist.group.WORLD, placement, E, rank, chunks=2)
    d.routing = Counter()
    d(x, ids, weights, local)
    d(x[:1], ids[:1], weights[:1], local)
    firsts = [e for ids_of in everyone for e in (ids_of[0] if ids_of else []) if e >= 0]
    loads = [routed_here, [firsts.count(e) for e in placement[rank]]]
    rows = [ids, ids[:1]]
    routing = Counter(tuple(sorted(e for e in row if e >= 0)) for call in rows for row in call.tolist())
    # each kept assignment goes out as one row and each computed row comes back as one
    rows_sent = sum(int((call >= 0).sum()) for call in rows) + sum(map(sum, loads))
    s = d.stats.snapshot()
    # overlap off: every exchange has finished when it is handed back; on: it is still to be waited for
    flights = [AllToAllDispatcher(dist.group.WORLD, placement, E, rank, overlap_chunks=overlap)._start(
        x[:0], [0] * EP, [0] * EP, "empty") for overlap in (False, True)]
    finished = [flight.work is None for flight in flights]
    flights[1].finish()
    wrong = [d.routing != routing, s.loads != loads, s.rows_sent != rows_sent, finished != [True, False]]
    result = torch.tensor([max(worst), float(sum(wrong))])
    dist.all_reduce(result, op=dist.ReduceOp.MAX)
    return result.tolist()


def _local_experts(experts: list[int]) -> GroupedExperts:
    """This rank's slots of the experts of seed 7 (an expert held twice is the same weights)."""
    local = GroupedExperts(len(experts), D, H, "mlp")
    for name, p in local.named_parameters():
        mark_shard(local, name, (E, *p.shape[1:]), (experts, slice(None), slice(None)))
    return materialize(local, seed=7, dtype=torch.float32)


def test_dropped_assignments_routing_record_loads_and_rows_sent_match_hand_counts():
    """Dropped assignments contribute nothing on the flat, chunked, automatic, hierarchical and
    low-latency paths, and with balanced replica routing (outputs within float rounding of the
    naive sum of the kept ones); the routing record counts each token's kept experts as a sorted
    tuple (a token with none as ());
    each call's load is the rows every rank routed to this rank's experts; rows sent count one
    row out per kept assignment and one back per computed row; without overlap every exchange
    is waited for as soon as it is issued."""
    err, wrong = launch(_edges, EP)
    assert err < 1e-5
    assert wrong == 0


def _exchanges_per_call(tokens_on_rank_0: int, device) -> int:
    """all_to_all_single calls of one automatic-chunk call in which rank 0 has `tokens_on_rank_0`
    tokens and the others none (every rank must issue the same ones)."""
    rank = dist.get_rank()
    T = tokens_on_rank_0 if rank == 0 else 0
    gen = torch.Generator().manual_seed(rank)
    x, weights = torch.randn(T, D, generator=gen), torch.rand(T, K, generator=gen)
    ids = torch.rand(T, E, generator=gen).argsort(dim=1)[:, :K]
    placement = contiguous_placement(E, EP)
    d = AllToAllDispatcher(dist.group.WORLD, placement, E, rank)
    calls, real = [], dist.all_to_all_single
    dist.all_to_all_single = lambda *args, **kw: (calls.append(1), real(*args, **kw))[1]
    try:
        d(x, ids, weights, _local_experts(placement[rank]))
    finally:
        dist.all_to_all_single = real
    counts = torch.tensor([len(calls), -len(calls)])
    dist.all_reduce(counts, op=dist.ReduceOp.MAX)
    assert counts[0] == -counts[1], "ranks issued different exchanges"
    return int(counts[0])


def test_automatic_chunks_follow_the_largest_rank_keep_1024_assignments_and_stop_at_8():
    """One count exchange, then one out and one back per chunk. 2100 tokens x 2 on rank 0 alone:
    4200 assignments split in 4 chunks of 1050 (8 would be 525 each); 8200 x 2 = 16400: 8 chunks
    (the most, the number of fine slices, though 16 would keep 1025 each); 500 x 2: one chunk;
    1024 x 2: two chunks of 1024 exactly."""
    assert launch(functools.partial(_exchanges_per_call, 2100), EP) == 1 + 2 * 4
    assert launch(functools.partial(_exchanges_per_call, 8200), EP) == 1 + 2 * 8
    assert launch(functools.partial(_exchanges_per_call, 500), EP) == 1 + 2 * 1
    assert launch(functools.partial(_exchanges_per_call, 1024), EP) == 1 + 2 * 2  # 1024 each, exactly
