"""Choosing the next token on the device (engine/sampling.py), as a specification checked against
probabilities computed here independently: greedy is the argmax (also at a temperature too
small to divide by); a random token follows softmax(logits / T) restricted to the top-k and the
nucleus; a request's draws depend only on (its seed, the token's index), never on its
batch-mates, so successive tokens of one request differ; nothing is read but the ids."""

import math

import pytest
import torch

from expertmesh.config import Workload
from expertmesh.engine.sampling import sample, sample_requests, static_seed, uniform
from fake_device import FakeDevice, OnDevice, to_host

V = 50
PROBS = (0.35, 0.25, 0.2, 0.1, 0.06, 0.04)
# The chi-square statistic's 1 - 1e-6 quantile by degrees of freedom (scipy.stats.chi2.isf(1e-6, df)):
# a sampler that follows the distribution fails one of these tests once in a million draws of a seed.
CHI2_BOUND = {1: 23.93, 2: 27.63, 3: 30.66, 4: 33.38, 5: 35.89}


def logits_of(rows: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(rows, V, generator=torch.Generator().manual_seed(seed)) * 2


def expected(probs: tuple[float, ...], temperature: float, top_p: float = 1.0, top_k: int = 0) -> list[float]:
    """softmax(log(probs) / T), restricted to the top_k most likely and then to the smallest
    prefix, most likely first, whose mass reaches top_p; renormalized. Plain Python."""
    tempered = [p ** (1 / temperature) for p in probs]
    tempered = [p / sum(tempered) for p in tempered]
    order = sorted(range(len(probs)), key=lambda i: -tempered[i])[:top_k or len(probs)]
    kept, mass = [], 0.0
    for i in order:
        if mass >= top_p:
            break
        kept.append(i)
        mass += tempered[i]
    return [tempered[i] / mass if i in kept else 0.0 for i in range(len(probs))]


def assert_follows(tokens: list[int], want: list[float]) -> None:
    """Tokens outside the support never appear; counts inside it pass a chi-square test."""
    n = len(tokens)
    counts = [tokens.count(i) for i in range(len(want))]
    assert set(tokens) <= {i for i, p in enumerate(want) if p > 0}, counts
    support = [i for i, p in enumerate(want) if p > 0]
    chi2 = sum((counts[i] - n * want[i]) ** 2 / (n * want[i]) for i in support)
    assert chi2 < CHI2_BOUND[len(support) - 1], (counts, [round(n * p) for p in want], chi2)


def successive_draws(temperature: float, top_p: float = 1.0, top_k: int = 0, n: int = 3000,
                     seed: int = 11) -> list[int]:
    """Tokens 0 .. n - 1 of one request whose logits are log(PROBS) at every step."""
    logits = torch.tensor([math.log(p) for p in PROBS]).repeat(n, 1)
    return sample_requests(logits, [temperature] * n, [top_p] * n, [top_k] * n, [seed] * n,
                           list(range(n))).tolist()


@pytest.mark.parametrize("temperature", [1.0, 0.5, 2.0])
def test_successive_tokens_of_one_request_follow_the_tempered_distribution(temperature):
    assert_follows(successive_draws(temperature), expected(PROBS, temperature))


@pytest.mark.parametrize("top_p, top_k", [(0.7, 0), (1.0, 3), (0.8, 2), (0.9, 4), (1e-9, 0)])
def test_top_k_and_top_p_restrict_the_support_exactly(top_p, top_k):
    """At T = 1, top_p 0.7 keeps {0, 1} (0.35 alone falls short), 0.9 with top_k 4 keeps
    {0, 1, 2, 3} (0.8 < 0.9), top_k 3 keeps {0, 1, 2}; a tiny top_p keeps the argmax alone."""
    want = expected(PROBS, 1.0, top_p, top_k)
    tokens = successive_draws(1.0, top_p, top_k)
    assert_follows(tokens, want) if sum(p > 0 for p in want) > 1 else set(tokens) == {0}


def test_draws_of_many_seeds_at_one_index_follow_the_distribution_too():
    n = 3000
    logits = torch.tensor([math.log(p) for p in PROBS]).repeat(n, 1)
    tokens = sample_requests(logits, [1.0] * n, [1.0] * n, [0] * n, list(range(n)), [7] * n).tolist()
    assert_follows(tokens, expected(PROBS, 1.0))


@pytest.mark.parametrize("temperature", [0.0, 1e-320, 5e-324, 1e-30])
@pytest.mark.parametrize("top_p, top_k", [(1.0, 0), (0.5, 0), (1.0, 5)])
def test_a_zero_or_tiny_temperature_is_the_argmax(temperature, top_p, top_k):
    logits = logits_of(64)
    want = [max(range(V), key=lambda v: row[v]) for row in logits.tolist()]
    n = len(want)
    tokens = sample_requests(logits, [temperature] * n, [top_p] * n, [top_k] * n, list(range(n)), [3] * n)
    assert tokens.dtype == torch.int64 and tokens.tolist() == want


@pytest.mark.parametrize("seed", [0, -1, 100000000000000, -100000000000000, 2**63 - 1, -2**63, 2**70])
def test_every_int64_seed_draws_and_its_draws_stay_in_range(seed):
    """Seeds of any size (the engine thread once died on 10^14): uniforms in (0, 1), tokens in
    the vocabulary, successive ones not all equal."""
    assert all(0 < uniform(seed, i) < 1 for i in range(100))
    n = 40
    tokens = sample_requests(logits_of(1).repeat(n, 1), [1.5] * n, [0.95] * n, [0] * n, [seed] * n,
                             list(range(n))).tolist()
    assert all(0 <= t < V for t in tokens) and len(set(tokens)) > 1


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_a_request_draws_the_same_token_wherever_it_sits_in_any_batch(dtype):
    logits = logits_of(6).to(dtype)
    temperature, top_p, top_k = [0.0, 0.8, 0.0, 1.5, 0.7, 1.0], [1.0, 0.9, 1.0, 1.0, 0.5, 1.0], [0, 0, 0, 7, 0, 0]
    seeds, index = [3, 1, 4, 1, 5, 9], [0, 2, 6, 5, 3, 5]
    together = sample_requests(logits, temperature, top_p, top_k, seeds, index).tolist()
    alone = [sample_requests(logits[i:i + 1], temperature[i:i + 1], top_p[i:i + 1], top_k[i:i + 1],
                             seeds[i:i + 1], index[i:i + 1]).item() for i in range(6)]
    backwards = sample_requests(logits.flip(0), temperature[::-1], top_p[::-1], top_k[::-1], seeds[::-1],
                                index[::-1]).tolist()[::-1]
    assert together == alone == backwards
    assert [together[i] for i in (0, 2)] == logits[[0, 2]].argmax(-1).tolist()


@pytest.mark.parametrize("split", [[4, 4], [1, 7], [3, 0, 5], [1] * 8])
def test_the_static_batch_draws_as_the_engine_draws_each_request(split):
    """`sample` (the static loop) gives row r the draws of a request seeded `static_seed(seed, r)`,
    whatever rows a call holds."""
    logits = logits_of(8)
    w = Workload(batch_size=8, prompt_len=1, gen_len=1, temperature=0.8, top_p=0.9, seed=1)
    parts, start = [], 0
    for n in split:
        rows = torch.arange(start, start + n)
        parts.append(sample(logits[rows], rows, step=5, workload=w))
        start += n
    requests = sample_requests(logits, [0.8] * 8, [0.9] * 8, [0] * 8, [static_seed(1, r) for r in range(8)], [5] * 8)
    assert torch.equal(torch.cat(parts), requests)


def test_sampling_on_the_device_uploads_its_rows_values_once_and_reads_nothing():
    with FakeDevice() as mode:
        logits = OnDevice(logits_of(128))
        n = 128
        for top_p in (1.0, 0.9):  # inverse CDF in vocabulary order, then over sorted probabilities
            tokens = sample_requests(logits, [0.0, 1.0] * (n // 2), [top_p] * n, [0] * n, list(range(n)), [1] * n)
        reads = mode.counts()
        tokens.cpu()
        assert reads == (0, 2, 0) and mode.counts() == (1, 2, 0)
    assert to_host(tokens).shape == (n,)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_greedy_rows_take_the_first_of_tied_maxima_as_argmax_does(dtype):
    """Greedy tokens are argmax's, also where a row's maximum is tied (common in bf16)."""
    logits = torch.randint(0, 4, (64, 300), generator=torch.Generator().manual_seed(0)).to(dtype)
    got = sample_requests(logits, [0.0] * 64, [1.0] * 64, [0] * 64, list(range(64)), [0] * 64)
    assert torch.equal(got, logits.argmax(dim=-1))
