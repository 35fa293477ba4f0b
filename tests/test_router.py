"""Router: softmax over all experts, keep the top k, optionally renormalize (model/moe.py)."""

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from expertmesh.model.moe import Router

# 4 experts over d_model 2. Logits by hand (weight row . x):
#   token 0, x = (1.0, 0.5):  expert 0: 1.0, expert 1: 0.5, expert 2: 1.5, expert 3: -1.0
#   token 1, x = (0.2, -0.3): expert 0: 0.2, expert 1: -0.3, expert 2: -0.1, expert 3: -0.2
WEIGHT = [[1.0, 0.0], [0.0, 1.0], [1.0, 1.0], [-1.0, 0.0]]
X = [[1.0, 0.5], [0.2, -0.3]]
LOGITS = [[1.0, 0.5, 1.5, -1.0], [0.2, -0.3, -0.1, -0.2]]
TOP2_IDS = [[2, 0], [0, 2]]


def _router(weight, top_k: int, renormalize: bool) -> Router:
    weight = torch.tensor(weight, dtype=torch.float32)
    router = Router(weight.shape[1], weight.shape[0], top_k, renormalize)
    router.weight = nn.Parameter(weight, requires_grad=False)
    return router


def _softmax(values: list[float]) -> list[float]:
    z = sum(math.exp(v) for v in values)
    return [math.exp(v) / z for v in values]


def test_top2_of_the_worked_example_picks_the_largest_logits_in_order():
    ids, _ = _router(WEIGHT, 2, True)(torch.tensor(X))
    assert ids.dtype == torch.int64
    assert ids.tolist() == TOP2_IDS


def test_renormalized_weights_are_a_softmax_over_the_top_k_logits():
    _, weights = _router(WEIGHT, 2, True)(torch.tensor(X))
    expected = [_softmax([row[e] for e in ids]) for row, ids in zip(LOGITS, TOP2_IDS)]
    torch.testing.assert_close(weights, torch.tensor(expected), rtol=1e-6, atol=1e-7)


def test_without_renormalize_weights_are_the_raw_probabilities_over_all_experts():
    _, weights = _router(WEIGHT, 2, False)(torch.tensor(X))
    expected = [[_softmax(row)[e] for e in ids] for row, ids in zip(LOGITS, TOP2_IDS)]
    torch.testing.assert_close(weights, torch.tensor(expected), rtol=1e-6, atol=1e-7)
    assert all(s < 1 for s in weights.sum(-1).tolist())


def test_top1_with_renormalize_gives_weight_one():
    ids, weights = _router(WEIGHT, 1, True)(torch.tensor(X))
    assert ids.tolist() == [[2], [0]]
    assert weights.tolist() == [[1.0], [1.0]]


def test_weights_take_the_input_dtype_and_zero_tokens_give_empty_outputs():
    router = _router(WEIGHT, 2, True)
    router.weight = nn.Parameter(router.weight.bfloat16(), requires_grad=False)
    ids, weights = router(torch.tensor(X, dtype=torch.bfloat16))
    assert weights.dtype == torch.bfloat16 and ids.tolist() == TOP2_IDS
    ids, weights = router(torch.zeros(0, 2, dtype=torch.bfloat16))
    assert ids.shape == (0, 2) and weights.shape == (0, 2)


@settings(max_examples=25, deadline=None)
@given(n_experts=st.integers(1, 8), d_model=st.integers(1, 6), tokens=st.integers(1, 5),
       k_fraction=st.floats(0, 1), renormalize=st.booleans(), seed=st.integers(0, 2**16))
def test_random_routers_match_a_per_token_python_reference(n_experts, d_model, tokens, k_fraction,
                                                          renormalize, seed):
    top_k = max(1, round(k_fraction * n_experts))
    gen = torch.Generator().manual_seed(seed)
    weight = torch.randn(n_experts, d_model, generator=gen, dtype=torch.float64)
    x = torch.randn(tokens, d_model, generator=gen, dtype=torch.float64)
    ids, weights = _router(weight.float().tolist(), top_k, renormalize)(x.float())
    for t in range(tokens):
        logits = [sum(float(weight[e, i]) * float(x[t, i]) for i in range(d_model))
                  for e in range(n_experts)]
        ranked = sorted(range(n_experts), key=lambda e: -logits[e])
        if top_k < n_experts and abs(logits[ranked[top_k - 1]] - logits[ranked[top_k]]) < 1e-4:
            continue  # a near tie at the cut: either expert is a correct answer
        assert sorted(ids[t].tolist()) == sorted(ranked[:top_k])
        probs = _softmax(logits)
        kept = [probs[e] for e in ids[t].tolist()]
        assert all(a >= b - 1e-6 for a, b in zip(kept, kept[1:]))  # largest first
        expected = [p / sum(kept) for p in kept] if renormalize else kept
        assert weights[t].tolist() == pytest.approx(expected, rel=1e-4, abs=1e-6)
