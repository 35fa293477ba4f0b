"""The MoE block (model/moe.py) against a naive reference that computes every token's experts one by
one with plain matrix-vector products: routing, sorting by expert, grouped compute, combine."""

import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from expertmesh.model import moe
from expertmesh.model.moe import GroupedExperts, LocalDispatcher, MoEBlock, combine, sort_assignments
from expertmesh.model.synthetic import materialize

D, H, E = 16, 32, 6  # fp32 rows of 64 and 128 bytes: the grouped kernel applies
KINDS = ("mlp", "swiglu")


def naive_expert(experts: GroupedExperts, e: int, x: torch.Tensor) -> torch.Tensor:
    """Expert e on one token x `[D]`."""
    if experts.kind == "swiglu":
        h = F.silu(experts.w_gate[e] @ x) * (experts.w_up[e] @ x)
    else:
        h = F.gelu(experts.w_up[e] @ x)
    return experts.w_down[e] @ h


def naive_mix(experts: GroupedExperts, x: torch.Tensor, ids: list[list[int]],
              weights: list[list[float]]) -> torch.Tensor:
    """Each token's weighted sum of its experts' outputs, token by token, expert by expert."""
    out = torch.zeros(x.shape[0], experts.w_down.shape[1])
    for t, (token_ids, token_weights) in enumerate(zip(ids, weights)):
        for e, w in zip(token_ids, token_weights):
            out[t] += w * naive_expert(experts, e, x[t])
    return out


def naive_block(block: MoEBlock, x: torch.Tensor) -> torch.Tensor:
    """The whole block, with the routing done per token in Python: x `[T, D]` -> `[T, D]`."""
    ids, weights = [], []
    for t in range(x.shape[0]):
        logits = (block.router.weight @ x[t]).tolist()
        z = sum(math.exp(v) for v in logits)
        probs = [math.exp(v) / z for v in logits]
        top = sorted(range(len(probs)), key=lambda e: -probs[e])[: block.router.top_k]
        kept = [probs[e] for e in top]
        ids.append(top)
        weights.append([p / sum(kept) for p in kept] if block.router.renormalize else kept)
    return naive_mix(block.experts, x, ids, weights)


def make_block(kind: str, top_k: int = 2, renormalize: bool = True, n_experts: int = E,
               seed: int = 0) -> MoEBlock:
    return materialize(MoEBlock(D, n_experts, top_k, H, kind, renormalize), seed, torch.float32)


def make_experts(kind: str, n_experts: int = E, d_model: int = D, hidden: int = H,
                 seed: int = 0) -> GroupedExperts:
    return materialize(GroupedExperts(n_experts, d_model, hidden, kind), seed, torch.float32)


def random_routing(tokens: int, n_experts: int, top_k: int, seed: int):
    """Distinct experts per token and positive weights, `[T, k]` each."""
    gen = torch.Generator().manual_seed(seed)
    ids = torch.rand(tokens, n_experts, generator=gen).argsort(dim=-1)[:, :top_k]
    return ids, torch.rand(tokens, top_k, generator=gen)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("renormalize", [True, False])
def test_block_equals_the_per_token_reference(kind, renormalize):
    block = make_block(kind, renormalize=renormalize, seed=1)
    x = torch.randn(2, 9, D, generator=torch.Generator().manual_seed(0))
    out = block(x)
    assert out.shape == x.shape
    torch.testing.assert_close(out.reshape(-1, D), naive_block(block, x.reshape(-1, D)))


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("top_k", [1, 2])
def test_block_with_every_token_routed_to_one_expert(kind, top_k):
    """Router weights that make expert 4 win for every token (and, with k = 2, expert 0 second):
    every other expert gets no token."""
    block = make_block(kind, top_k=top_k)
    router = torch.zeros(E, D)
    router[:, 0] = -torch.arange(1.0, E + 1)  # expert 0 is the least bad of the rest ...
    router[4, 0] = 10.0  # ... and expert 4 the best, for every token with x[:, 0] > 0
    block.router.weight = nn.Parameter(router, requires_grad=False)
    x = torch.randn(11, D, generator=torch.Generator().manual_seed(2))
    x[:, 0] = x[:, 0].abs() + 0.5

    ids, _ = block.router(x)
    assert ids[:, 0].tolist() == [4] * 11
    if top_k == 2:
        assert ids[:, 1].tolist() == [0] * 11
    torch.testing.assert_close(block(x), naive_block(block, x))


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("shape", [(0, D), (0, 3, D), (2, 0, D)])
def test_block_with_zero_tokens_returns_an_empty_tensor_of_the_input_shape(kind, shape):
    x = torch.zeros(shape)
    out = make_block(kind)(x)
    assert out.shape == x.shape and out.dtype == x.dtype


@settings(max_examples=25, deadline=None)
@given(tokens=st.integers(0, 12), n_experts=st.integers(1, 8), k_fraction=st.floats(0, 1),
       kind=st.sampled_from(KINDS), seed=st.integers(0, 2**16))
def test_local_dispatch_of_random_routings_equals_the_reference(tokens, n_experts, k_fraction,
                                                               kind, seed):
    """Any routing, including experts with no token and tokens fewer than experts."""
    top_k = max(1, round(k_fraction * n_experts))
    experts = make_experts(kind, n_experts, seed=seed)
    ids, weights = random_routing(tokens, n_experts, top_k, seed)
    x = torch.randn(tokens, D, generator=torch.Generator().manual_seed(seed))
    out = LocalDispatcher()(x, ids, weights, experts)
    torch.testing.assert_close(out, naive_mix(experts, x, ids.tolist(), weights.tolist()))


@settings(max_examples=25, deadline=None)
@given(tokens=st.integers(0, 10), n_slots=st.integers(1, 6), top_k=st.integers(1, 3),
       seed=st.integers(0, 2**16))
def test_sort_then_combine_is_the_weighted_sum_of_each_tokens_values(tokens, n_slots, top_k, seed):
    gen = torch.Generator().manual_seed(seed)
    slots = torch.randint(0, n_slots, (tokens, top_k), generator=gen)
    values = torch.randn(tokens, top_k, 3, generator=gen)  # one value per (token, expert)
    weights = torch.rand(tokens, top_k, generator=gen)

    order, counts = sort_assignments(slots, n_slots)
    flat = slots.reshape(-1).tolist()
    assert counts.tolist() == [flat.count(s) for s in range(n_slots)]
    # grouped by slot, and stable: within a slot, assignments keep their original order
    assert order.tolist() == sorted(range(len(flat)), key=lambda i: (flat[i], i))

    out = combine(values.reshape(-1, 3)[order], order, weights)
    expected = torch.zeros(tokens, 3)
    for t in range(tokens):
        for j in range(top_k):
            expected[t] += weights[t, j] * values[t, j]
    torch.testing.assert_close(out, expected)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("counts", [[3, 0, 5, 1, 0, 4], [13, 0, 0, 0, 0, 0], [0, 0, 0, 0, 0, 13]])
def test_grouped_mm_and_per_expert_loop_agree(kind, counts, monkeypatch):
    experts = make_experts(kind)
    x = torch.randn(sum(counts), D, generator=torch.Generator().manual_seed(3))
    counts = torch.tensor(counts)

    calls = []
    grouped_mm = torch._grouped_mm
    monkeypatch.setattr(torch, "_grouped_mm", lambda *a, **kw: calls.append(1) or grouped_mm(*a, **kw))
    grouped = experts(x, counts)
    assert calls, "the grouped kernel should apply to aligned fp32 on CPU"

    calls.clear()
    monkeypatch.setattr(moe, "_grouped_mm_applies", lambda x, hidden: False)
    looped = experts(x, counts)
    assert not calls
    torch.testing.assert_close(grouped, looped)
    ids = [[e] for e, n in enumerate(counts.tolist()) for _ in range(n)]
    torch.testing.assert_close(grouped, naive_mix(experts, x, ids, [[1.0]] * len(ids)))


def test_grouped_mm_applies_only_to_rows_of_whole_16_byte_units():
    fp32, bf16 = torch.zeros(2, 16), torch.zeros(2, 16, dtype=torch.bfloat16)
    assert moe._grouped_mm_applies(fp32, 32) and moe._grouped_mm_applies(bf16, 32)
    assert not moe._grouped_mm_applies(torch.zeros(2, 6), 32)  # 24-byte rows of x
    assert not moe._grouped_mm_applies(bf16, 12)  # 24-byte rows of the hidden activations


@pytest.mark.parametrize("kind", KINDS)
def test_experts_of_unaligned_sizes_fall_back_to_the_loop(kind):
    experts = make_experts(kind, n_experts=3, d_model=6, hidden=10)
    x = torch.randn(5, 6, generator=torch.Generator().manual_seed(4))
    ids, weights = random_routing(5, 3, 2, seed=4)
    out = LocalDispatcher()(x, ids, weights, experts)
    torch.testing.assert_close(out, naive_mix(experts, x, ids.tolist(), weights.tolist()))
