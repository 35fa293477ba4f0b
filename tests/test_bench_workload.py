"""`expertmesh bench serve`'s workloads (server/bench.py), without a server: the shared-prefix
dataset and the flags that describe it."""

import pytest

from expertmesh.server.bench import BenchConfig, Outcome, summarize, workload


def config(**kw):
    return BenchConfig(url="http://x/v1", num_prompts=kw.pop("n", 40), rate=kw.pop("rate", 4.0),
                       input_len=(16, 64), output_len=(4, 4), vocab=1000, **kw)


def test_shared_prefix_prompts_are_one_of_k_prefixes_then_a_suffix_of_their_own():
    jobs = workload(config(dataset="shared-prefix", prefix_len=100, num_prefixes=3))
    heads = {tuple(p[:100]) for _, p, _ in jobs}
    assert len(heads) == 3
    assert all(16 <= len(p) - 100 <= 64 for _, p, _ in jobs)
    assert len({tuple(p[100:]) for _, p, _ in jobs}) == len(jobs)
    assert [at for at, _, _ in jobs] == sorted(at for at, _, _ in jobs) and jobs[-1][0] > 0
    assert workload(config(dataset="shared-prefix", prefix_len=100, num_prefixes=3)) == jobs  # seeded


def test_the_random_dataset_shares_no_prefix():
    jobs = workload(config())
    assert len({tuple(p[:8]) for _, p, _ in jobs}) == len(jobs)


def test_the_hit_rate_is_cached_over_prompt_tokens_of_completed_requests():
    done = [Outcome(0.0, 100, times=[1.0], tokens=1, cached=80), Outcome(0.0, 50, times=[1.0], tokens=1),
            Outcome(0.0, 70, error="x", cached=70)]
    assert summarize(config(), done, 1.0)["prefix_hit_rate"] == pytest.approx(80 / 150)


@pytest.mark.parametrize("kw, flag", [(dict(dataset="shared"), "--dataset"),
                                      (dict(dataset="shared-prefix"), "--prefix-len"),
                                      (dict(dataset="shared-prefix", prefix_len=8, num_prefixes=0), "--num-prefixes")])
def test_a_bad_dataset_is_refused_naming_the_flag(kw, flag):
    with pytest.raises(ValueError, match=flag):
        config(**kw)
