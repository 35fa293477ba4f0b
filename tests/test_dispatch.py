"""The expert-parallel dispatcher alone, on 4 local gloo ranks, against a naive per-token reference."""

import functools

import pytest
import torch
import torch.distributed as dist

from expertmesh.launch import launch
from expertmesh.model.moe import GroupedExperts
from expertmesh.model.synthetic import mark_shard, materialize
from expertmesh.parallel.dispatch import AllToAllDispatcher, contiguous_placement, slot_table

E, D, H, K, EP = 8, 16, 32, 2, 4
TOKENS_PER_RANK = [5, 7, 0, 3]  # rank 2 sends nothing


def _routing(pattern: str, rank: int, T: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(100 + rank)
    if pattern == "random":
        return torch.rand(T, E, generator=gen).argsort(dim=1)[:, :K]
    if pattern == "one_expert":
        return torch.full((T, K), 5)
    if pattern == "one_rank":  # experts 2 and 3 both live on rank 1
        return torch.tensor([[2, 3]] * T, dtype=torch.long).reshape(T, K)
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

    out = AllToAllDispatcher(dist.group.WORLD, placement, E)(x, ids, weights, local)

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


def test_slot_table_numbers_experts_by_owner_rank():
    slots = slot_table([[2, 0], [1, 3]], 4)
    assert slots.tolist() == [1, 2, 0, 3]
