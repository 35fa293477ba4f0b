"""Edges of the sampling specification (engine/sampling.py) that `test_sampling.py`'s distributions
pass over: top-k of 1 alone in its batch, a row without limits next to rows with them, and a
nucleus whose prefix reaches top_p exactly. Expectations are worked out here by hand."""

import math

import torch

from expertmesh.engine.sampling import sample_requests

N = 400  # draws (seeds) per check: a wrong support shows in far fewer


def test_top_k_of_one_is_the_argmax_at_any_temperature_even_alone():
    logits = torch.randn(N, 30, generator=torch.Generator().manual_seed(2))
    tokens = sample_requests(logits, [2.0] * N, [1.0] * N, [1] * N, list(range(N)), [0] * N)
    assert tokens.tolist() == logits.argmax(-1).tolist()


def test_a_row_without_limits_draws_the_same_next_to_rows_with_them():
    """Row 0 has no top-k / top-p; its batch-mates have both, which makes the batch take the
    filtering path. Its draw over N seeds is the draw it makes alone, and covers its support."""
    logits = torch.tensor([math.log(p) for p in (0.4, 0.3, 0.2, 0.1)])
    alone, together = [], []
    for seed in range(N):
        alone.append(sample_requests(logits[None], [1.0], [1.0], [0], [seed], [0]).item())
        batch = sample_requests(logits.repeat(3, 1), [1.0, 0.7, 1.0], [1.0, 1.0, 0.5], [0, 2, 0],
                                [seed, 1, 2], [0, 0, 0])
        together.append(batch[0].item())
    assert together == alone
    assert set(alone) == {0, 1, 2, 3}


def test_a_nucleus_stops_at_the_token_whose_prefix_reaches_top_p_exactly():
    """Four equal logits: each token has probability 1/4 exactly, ties sorted in id order. The
    prefix {0, 1} has mass 1/2, which reaches top_p 1/2, so token 2 is not kept; top_p just
    over 1/2 keeps token 2 too."""
    n = N
    exact = sample_requests(torch.zeros(n, 4), [1.0] * n, [0.5] * n, [0] * n, list(range(n)), [0] * n)
    assert set(exact.tolist()) == {0, 1}
    over = sample_requests(torch.zeros(n, 4), [1.0] * n, [0.5 + 1e-9] * n, [0] * n, list(range(n)), [0] * n)
    assert set(over.tolist()) == {0, 1, 2}
