"""Choosing the next token (engine/sampling.py): greedy is argmax; a random draw depends only on
(seed, step, global row), so any split of the batch samples the same tokens."""

import math

import pytest
import torch

from expertmesh.config import Workload
from expertmesh.engine.sampling import finish_draws, sample, start_draws

V = 50


def logits_of(rows: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(rows, V, generator=torch.Generator().manual_seed(seed)) * 2


def workload(batch: int, **kw) -> Workload:
    return Workload(batch_size=batch, prompt_len=1, gen_len=1, **kw)


def test_greedy_is_the_argmax_of_each_row():
    logits = logits_of(6)
    expected = [max(range(V), key=lambda v: row[v]) for row in logits.tolist()]
    tokens = sample(logits, torch.arange(6), step=0, workload=workload(6))
    assert tokens.dtype == torch.int64 and tokens.tolist() == expected


def test_a_temperature_draw_is_reproducible_and_changes_with_seed_and_step():
    logits, rows = logits_of(8), torch.arange(8)
    w = workload(8, temperature=1.0, seed=3)
    a = sample(logits, rows, step=2, workload=w)
    assert torch.equal(a, sample(logits, rows, step=2, workload=w))
    assert not torch.equal(a, sample(logits, rows, step=3, workload=w))
    assert not torch.equal(a, sample(logits, rows, step=2, workload=workload(8, temperature=1.0, seed=4)))


@pytest.mark.parametrize("split", [[4, 4], [1, 7], [3, 0, 5], [1] * 8])
def test_a_draw_does_not_depend_on_how_rows_are_split(split):
    logits = logits_of(8)
    w = workload(8, temperature=0.8, top_p=0.9, seed=1)
    whole = sample(logits, torch.arange(8), step=5, workload=w)
    parts, start = [], 0
    for n in split:
        rows = torch.arange(start, start + n)
        parts.append(sample(logits[rows], rows, step=5, workload=w))
        start += n
    assert torch.equal(torch.cat(parts), whole)


def test_a_tiny_top_p_keeps_only_the_most_likely_token():
    logits = logits_of(8)
    tokens = sample(logits, torch.arange(8), step=0, workload=workload(8, temperature=5.0, top_p=1e-9))
    assert tokens.tolist() == logits.argmax(-1).tolist()


def test_draws_follow_the_tempered_distribution_within_the_nucleus():
    """Probabilities 0.5, 0.3, 0.15, 0.05 at temperature 1, top_p 0.7: the nucleus is {0, 1}
    (0.5 alone falls short of 0.7), renormalized to 0.625 / 0.375."""
    n = 4000
    logits = torch.tensor([math.log(p) for p in (0.5, 0.3, 0.15, 0.05)]).repeat(n, 1)
    tokens = sample(logits, torch.arange(n), step=0, workload=workload(n, temperature=1.0, top_p=0.7))
    counts = torch.bincount(tokens, minlength=4).tolist()
    assert counts[2] == counts[3] == 0
    sigma = math.sqrt(n * 0.625 * 0.375)
    assert abs(counts[0] - 0.625 * n) < 4 * sigma


def test_temperature_sharpens_and_flattens():
    """At temperature 0.5 the probabilities 0.6 / 0.4 become 0.6^2 / (0.6^2 + 0.4^2) = 0.692."""
    n = 4000
    logits = torch.tensor([math.log(0.6), math.log(0.4)]).repeat(n, 1)
    for temperature, p0 in ((0.5, 0.36 / 0.52), (2.0, math.sqrt(0.6) / (math.sqrt(0.6) + math.sqrt(0.4)))):
        tokens = sample(logits, torch.arange(n), step=0, workload=workload(n, temperature=temperature))
        assert abs((tokens == 0).sum().item() - p0 * n) < 4 * math.sqrt(n * p0 * (1 - p0))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_a_request_samples_the_same_token_in_a_mixed_batch_as_alone(dtype):
    """Greedy and random rows share one copy to the host (`start_draws`): each row's token
    is still its own: the argmax, or the draw of its seed and index."""
    def sample_requests(*args):
        draws = start_draws(*args)
        return finish_draws(draws, draws.device.cpu())

    logits = logits_of(6).to(dtype)
    temperature, top_p = [0.0, 0.8, 0.0, 1.5, 0.7, 0.0], [1.0, 0.9, 1.0, 1.0, 0.5, 1.0]
    seeds, index = [3, 1, 4, 1, 5, 9], [0, 2, 6, 5, 3, 5]
    together = sample_requests(logits, temperature, top_p, seeds, index)
    alone = [sample_requests(logits[i:i + 1], temperature[i:i + 1], top_p[i:i + 1], seeds[i:i + 1],
                             index[i:i + 1])[0] for i in range(6)]
    assert together == alone
    assert [together[i] for i in (0, 2, 5)] == logits[[0, 2, 5]].argmax(-1).tolist()
