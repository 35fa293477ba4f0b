"""The expert-parallel dispatcher alone, on 4 local gloo ranks, against a naive per-token reference."""

import functools

import pytest
import torch
import torch.distributed as dist

from expertmesh.launch import launch
from expertmesh.model import moe
from expertmesh.model.forward_context import forward_context
from expertmesh.model.moe import GroupedExperts
from expertmesh.model.synthetic import mark_shard, materialize
from expertmesh.parallel.dispatch import AllToAllDispatcher
from expertmesh.parallel.placement import contiguous_placement, slot_table

E, D, H, K, EP = 8, 16, 32, 2, 4
TOKENS_PER_RANK = [5, 7, 0, 3]  # rank 2 sends nothing


def _routing(pattern: str, rank: int, tokens: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(100 + rank)
    if pattern == "random":
        return torch.rand(tokens, E, generator=gen).argsort(dim=1)[:, :K]
    if pattern == "one_expert":
        return torch.full((tokens, K), 5)
    if pattern == "one_rank":  # experts 2 and 3 both live on rank 1
        return torch.tensor([[2, 3]] * tokens, dtype=torch.long).reshape(tokens, K)
    raise ValueError(pattern)


def _dispatch_error(pattern: str, placement: list[list[int]], device) -> float:
    rank = dist.get_rank()
    T = TOKENS_PER_RANK[rank]
    gen = torch.Generator().manual_seed(rank)
    x = torch.randn(T, D, generator=gen)
    ids = _routing(pattern, rank, T)
    weights = torch.rand(T, K, generator=gen)

    full = materialize(GroupedExperts(E, D, H, "mlp"), seed=7, dtype=torch.float32)
    local = GroupedExperts(len(placement[rank]), D, H, "mlp")
    for name, p in local.named_parameters():
        mark_shard(local, name, (E, *p.shape[1:]), (placement[rank], slice(None), slice(None)))
    materialize(local, seed=7, dtype=torch.float32)

    out = AllToAllDispatcher(dist.group.WORLD, placement, E, rank)(x, ids, weights, local)

    expected = torch.zeros(T, D)
    for t in range(T):  # naive: each token's experts one by one
        for j in range(K):
            e = ids[t, j]
            h = torch.nn.functional.gelu(x[t] @ full.w_up[e].T)
            expected[t] += weights[t, j] * (h @ full.w_down[e].T)
    err = torch.tensor((out - expected).abs().max().item() if T else 0.0)
    dist.all_reduce(err, op=dist.ReduceOp.MAX)
    return err.item()


@pytest.mark.parametrize("pattern", ["random", "one_expert", "one_rank"])
def test_every_token_gets_its_experts_outputs_exactly_once(pattern):
    err = launch(functools.partial(_dispatch_error, pattern, contiguous_placement(E, EP)), EP)
    assert err < 1e-5


def test_any_placement_of_experts_on_ranks_gives_the_same_outputs():
    placement = [[7, 0], [3, 5], [1, 6], [4, 2]]
    assert launch(functools.partial(_dispatch_error, "random", placement), EP) < 1e-5


def _variants_against_flat(pattern: str, device) -> dict:
    """Largest |difference| of each exchange variant from the synchronous flat one-chunk path,
    and whether each overlapped variant equals its synchronous twin bit for bit."""
    rank = dist.get_rank()
    T = TOKENS_PER_RANK[rank]
    gen = torch.Generator().manual_seed(rank)
    x, ids, weights = torch.randn(T, D, generator=gen), _routing(pattern, rank, T), torch.rand(T, K, generator=gen)
    placement = contiguous_placement(E, EP)
    local = GroupedExperts(E // EP, D, H, "mlp")
    for name, p in local.named_parameters():
        mark_shard(local, name, (E, *p.shape[1:]), (placement[rank], slice(None), slice(None)))
    materialize(local, seed=7, dtype=torch.float32)
    nodes = [0, 0, 1, 1]  # 2 nodes x 2 ranks

    def run(**kw):
        return AllToAllDispatcher(dist.group.WORLD, placement, E, rank, **kw)(x, ids, weights, local)

    flat = run(chunks=1, overlap_chunks=False)
    variants = {"chunks=2": dict(chunks=2), "chunks=5": dict(chunks=5), "auto": dict(),
                "hierarchical": dict(chunks=1, peer_nodes=nodes, hierarchical=True),
                "hierarchical chunks=3": dict(chunks=3, peer_nodes=nodes, hierarchical=True)}
    report = {}
    for name, kw in variants.items():
        overlapped, synchronous = run(**kw), run(overlap_chunks=False, **kw)
        err = torch.tensor([(overlapped - flat).abs().max().item() if T else 0.0,
                            0.0 if torch.equal(overlapped, synchronous) else 1.0])
        dist.all_reduce(err, op=dist.ReduceOp.MAX)
        report[name] = (err[0].item(), err[1].item() == 0.0)
    return report


@pytest.mark.parametrize("pattern", ["random", "one_expert", "one_rank"])
def test_overlapped_chunked_and_hierarchical_exchanges_match_the_synchronous_path(pattern):
    """Overlap changes nothing, bit for bit. Splitting into chunks changes how many rows each
    expert matmul gets, and the BLAS kernel for another row count may round differently in the
    last bit, so chunked results are compared within 1e-6; the hierarchical exchange with one
    chunk computes the same rows per expert and must be exact. 5 chunks over 5, 7, 0 and 3
    tokens leave several chunks empty on some ranks."""
    report = launch(functools.partial(_variants_against_flat, pattern), EP)
    assert all(bitwise for _, bitwise in report.values()), report
    assert all(err < 1e-6 for err, _ in report.values()), report
    assert report["hierarchical"][0] == 0.0


def _cross_node_bytes(hierarchical: bool, device) -> int:
    """Rank 0 has t0 -> experts (2, 3), both on node 1, and t1 -> experts (0, 2)."""
    rank = dist.get_rank()
    T = 2 if rank == 0 else 0
    ids = torch.tensor([[2, 3], [0, 2]]) if rank == 0 else torch.zeros(0, 2, dtype=torch.long)
    placement = contiguous_placement(4, 4)
    local = GroupedExperts(1, D, H, "mlp")
    for name, p in local.named_parameters():
        mark_shard(local, name, (4, *p.shape[1:]), (placement[rank], slice(None), slice(None)))
    materialize(local, seed=7, dtype=torch.float32)
    d = AllToAllDispatcher(dist.group.WORLD, placement, 4, rank, peer_nodes=[0, 0, 1, 1], hierarchical=hierarchical)
    d(torch.randn(T, D), ids, torch.rand(T, 2), local)
    total = torch.tensor(d.stats.cross_node_bytes)
    dist.all_reduce(total)
    return int(total)


def test_cross_node_bytes_match_a_hand_count_for_flat_and_hierarchical():
    row = D * 4  # fp32
    # flat: t0 crosses twice (experts 2 and 3), t1 once (expert 2); results come back the same way
    assert launch(functools.partial(_cross_node_bytes, False), 4) == 2 * 3 * row
    # hierarchical: t0 and t1 cross once each to rank 2 with 2k fp32 of slots and weights; one
    # partial sum per token comes back
    assert launch(functools.partial(_cross_node_bytes, True), 4) == 2 * (row + 8 * 2) + 2 * row


def test_slot_table_numbers_experts_by_owner_rank():
    slots = slot_table([[2, 0], [1, 3]], 4)
    assert slots.tolist() == [1, 2, 0, 3]


def _low_latency_against_standard(pattern: str, placement: list[list[int]], grouped: bool, device) -> bool:
    """Whether the low-latency exchange gives the standard one-chunk path's outputs bit for bit,
    with some assignments skipped (-1, as capacity drops them) on every rank but the empty one."""
    if not grouped:
        moe._grouped_mm_applies = lambda x, hidden: False
    rank = dist.get_rank()
    T = TOKENS_PER_RANK[rank]
    gen = torch.Generator().manual_seed(rank)
    x, ids, weights = torch.randn(T, D, generator=gen), _routing(pattern, rank, T), torch.rand(T, K, generator=gen)
    ids = ids.clone()
    ids[::3, 1] = -1
    local = GroupedExperts(len(placement[rank]), D, H, "mlp")
    for name, p in local.named_parameters():
        mark_shard(local, name, (E, *p.shape[1:]), (placement[rank], slice(None), slice(None)))
    materialize(local, seed=7, dtype=torch.float32)
    standard = AllToAllDispatcher(dist.group.WORLD, placement, E, rank, chunks=1)(x, ids, weights, local)
    fast = AllToAllDispatcher(dist.group.WORLD, placement, E, rank)
    with forward_context(low_latency_tokens=max(TOKENS_PER_RANK)):
        low_latency = fast(x, ids, weights, local)
    same = torch.tensor(float(torch.equal(low_latency, standard)))
    dist.all_reduce(same, op=dist.ReduceOp.MIN)
    return bool(same.item())


@pytest.mark.parametrize("grouped", [True, False], ids=["grouped-mm", "per-expert-loop"])
@pytest.mark.parametrize("pattern, placement", [
    ("random", contiguous_placement(E, EP)), ("one_expert", contiguous_placement(E, EP)),
    ("one_rank", contiguous_placement(E, EP)),
    ("random", [[7, 0, 5], [3], [1, 6, 2], [4, 2]]),  # uneven slots, expert 2 replicated
])
def test_the_low_latency_exchange_equals_the_standard_one_bit_for_bit(pattern, placement, grouped):
    """Fixed-size messages with counts inside: the experts see the same rows in the same order."""
    assert launch(functools.partial(_low_latency_against_standard, pattern, placement, grouped), EP)


def _low_latency_counters(idle: bool, device) -> list[int]:
    """Every rank's counters summed after one low-latency call (E experts on EP ranks, rank 0 on
    node 0 and ranks 1-3 on node 1; bound max(TOKENS_PER_RANK), or 0 with no token anywhere):
    rows sent, cross-node rows and bytes, calls, and the ranks whose rows computed per local
    expert differ from a count of every rank's routing."""
    rank = dist.get_rank()
    T = 0 if idle else TOKENS_PER_RANK[rank]
    gen = torch.Generator().manual_seed(rank)
    x, ids, weights = torch.randn(T, D, generator=gen), _routing("random", rank, T), torch.rand(T, K, generator=gen)
    placement = contiguous_placement(E, EP)
    local = GroupedExperts(E // EP, D, H, "mlp")
    for name, p in local.named_parameters():
        mark_shard(local, name, (E, *p.shape[1:]), (placement[rank], slice(None), slice(None)))
    materialize(local, seed=7, dtype=torch.float32)
    d = AllToAllDispatcher(dist.group.WORLD, placement, E, rank, peer_nodes=[0, 1, 1, 1])
    with forward_context(low_latency_tokens=0 if idle else max(TOKENS_PER_RANK)):
        out = d(x, ids, weights, local)
    assert out.shape == (T, D)
    everyone = [None] * EP
    dist.all_gather_object(everyone, ids.reshape(-1).tolist())
    routed = [sum(e == expert for ids_of in everyone for e in ids_of) for expert in placement[rank]]
    s = d.stats.snapshot()
    total = torch.tensor([s.rows_sent, s.cross_node_rows, s.cross_node_bytes, s.low_latency_calls,
                          int(s.loads[-1] != routed)])
    dist.all_reduce(total)
    return total.tolist()


def test_low_latency_counters_match_a_hand_count_padding_included():
    """Bound 7 tokens, top-2, 2 experts per rank: a block to each peer holds 7 x 2 = 14 rows
    whatever is routed. Each rank sends 4 blocks and gets 4 back (112 rows); rank 0 exchanges
    with 3 ranks of the other node, ranks 1-3 with 1 (2 x 14 x (3 + 1 + 1 + 1) = 168 cross-node
    rows of 16 fp32); each local expert computes the rows routed to it."""
    rows_sent, cross_rows, cross_bytes, calls, wrong_loads = launch(functools.partial(_low_latency_counters, False), EP)
    assert rows_sent == 4 * 112
    assert cross_rows == 168 and cross_bytes == 168 * 16 * 4
    assert calls == 4 and wrong_loads == 0


def test_an_idle_low_latency_call_sends_one_padding_row_per_block():
    """Bound 0 (no rank has a token, as in an idle data-parallel step): still one row per block,
    never an empty message: 2 x 4 rows per rank."""
    rows_sent, cross_rows, cross_bytes, calls, wrong_loads = launch(functools.partial(_low_latency_counters, True), EP)
    assert rows_sent == 4 * 8 and cross_rows == 2 * 6 and cross_bytes == 2 * 6 * 16 * 4
    assert calls == 4 and wrong_loads == 0


def test_exchange_stats_keep_the_loads_of_the_last_calls_only(monkeypatch):
    """A program that steps an engine for hours without reading its counters stays bounded: the
    oldest calls' loads go, the sums of rows sent do not."""
    from expertmesh.parallel import exchange_stats
    monkeypatch.setattr(exchange_stats, "MAX_LOADS", 4)
    stats = exchange_stats.ExchangeStats()
    for call in range(10):
        stats.loads.append([call, 1])
        stats.add([1, 2], [0, 0], 0, 8)
    snap = stats.snapshot()
    assert snap.loads == [[6, 1], [7, 1], [8, 1], [9, 1]] and snap.rows_sent == 30
    stats.reset()
    assert len(stats.loads) == 0 and stats.rows_sent == 0
