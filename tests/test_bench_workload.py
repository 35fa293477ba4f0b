"""`expertmesh bench serve`'s workloads (server/bench.py), without a server: the shared-prefix
and alternating datasets and the flags that describe them."""

import pytest

from expertmesh.server.bench import BenchConfig, Outcome, summarize, workload


def config(**kw):
    return BenchConfig(url="http://x/v1", num_prompts=kw.pop("n", 40), rate=kw.pop("rate", 4.0),
                       input_len=(16, 64), output_len=(4, 4), vocab=kw.pop("vocab", 1000), **kw)


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


ALT = dict(dataset="alternating", switch_every=4)


@pytest.mark.parametrize("kw, message", [
    (dict(dataset="shared"), "--dataset"),
    (dict(dataset="shared-prefix"), "--prefix-len"),
    (dict(dataset="shared-prefix", prefix_len=8, num_prefixes=0), "--num-prefixes"),
    (dict(dataset="alternating"), "needs --switch-every >= 1"),
    (dict(switch_every=4), "--switch-every applies to --dataset alternating only"),
    (dict(dataset="shared-prefix", prefix_len=8, tokens_a=(1, 9)), "--tokens-a applies to --dataset alternating"),
    (dict(prompts_b="b.txt"), "--prompts-b applies to --dataset alternating only"),
    (dict(ALT, tokens_a=(9, 1)), "--tokens-a 9:1 must be 0 <= low <= high"),
    (dict(ALT, tokens_b=(-1, 1)), "--tokens-b -1:1 must be"),
    (dict(ALT, tokens_a=(1, 10), tokens_b=(10, 20)), "--tokens-a 1:10 and --tokens-b 10:20 overlap"),
    (dict(ALT, tokens_b=(400, 600)), "--tokens-a 1:499 and --tokens-b 400:600 overlap"),  # A: default half
    (dict(ALT, vocab=3), "--vocab 3 in two halves, which needs --vocab >= 4"),
    (dict(ALT, prompts_a="a.txt"), "--prompts-a and --prompts-b go together"),
])
def test_a_bad_dataset_is_refused_naming_the_flag(kw, message):
    with pytest.raises(ValueError, match=message):
        config(**kw)


def test_prompt_files_must_be_readable_text_with_a_prompt_and_exclude_token_ranges(tmp_path):
    (tmp_path / "a.txt").write_text("hello\n")
    (tmp_path / "blank.txt").write_text("\n  \n")
    (tmp_path / "bytes.txt").write_bytes(b"\xff\xfe")
    a, missing = str(tmp_path / "a.txt"), str(tmp_path / "missing.txt")
    for b, message in [(missing, f"--prompts-b {missing}: cannot read it"),
                       (str(tmp_path / "blank.txt"), "blank.txt has no prompt"),
                       (str(tmp_path / "bytes.txt"), "bytes.txt is not UTF-8 text")]:
        with pytest.raises(ValueError, match=message):
            config(**ALT, prompts_a=a, prompts_b=b)
    with pytest.raises(ValueError, match="--tokens-a / --tokens-b do not apply with --prompts-a"):
        config(**ALT, prompts_a=a, prompts_b=a, tokens_b=(1, 2))
    assert config(**ALT, prompts_a=a, prompts_b=a).prompts_b == a


@pytest.mark.parametrize("argv, message", [
    (["--dataset", "alternating"], "--dataset alternating needs --switch-every >= 1"),
    (["--dataset", "alternating", "--switch-every", "8", "--tokens-a", "1-9"],
     "--tokens-a '1-9': give N or LOW:HIGH (token ids)"),
    (["--dataset", "alternating", "--switch-every", "8", "--tokens-a", "5:9", "--tokens-b", "9"],
     "--tokens-a 5:9 and --tokens-b 9:9 overlap"),
    (["--tokens-b", "50:99"], "--tokens-b applies to --dataset alternating only"),
])
def test_bad_alternating_flags_are_one_error_line(argv, message, cli_error):
    assert message in cli_error(["bench", "serve", *argv])



def alternating(**kw):
    return config(dataset="alternating", switch_every=kw.pop("switch_every", 5), n=kw.pop("n", 23), **kw)


def test_alternating_prompts_switch_between_the_two_halves_of_the_vocabulary_every_n_requests():
    """vocab 1000: A draws from 1..499, B from 500..999; 23 requests in phases of 5: AAAAA BBBBB
    AAAAA BBBBB AAA."""
    jobs = workload(alternating())
    halves = {"A": range(1, 500), "B": range(500, 1000)}
    phases = "AAAAABBBBBAAAAABBBBBAAA"
    assert len(jobs) == len(phases)
    for phase, (_, prompt, _) in zip(phases, jobs):
        assert all(t in halves[phase] for t in prompt) and 16 <= len(prompt) <= 64
    for phase, half in halves.items():  # spread over its half, not one corner of it
        drawn = {t for p, (_, prompt, _) in zip(phases, jobs) if p == phase for t in prompt}
        assert min(drawn) < 50 + half.start and max(drawn) > half.stop - 50 and len(drawn) > 200
    assert [at for at, _, _ in jobs] == sorted(at for at, _, _ in jobs) and jobs[-1][0] > 0
    assert workload(alternating()) == jobs  # from the config and seed alone
    assert workload(alternating(seed=1)) != jobs


def test_alternating_draws_from_the_inclusive_token_ranges_given():
    jobs = workload(alternating(tokens_a=(7, 9), tokens_b=(40, 41), switch_every=3, n=12))
    for i, (_, prompt, _) in enumerate(jobs):
        assert set(prompt) <= ({7, 8, 9} if i in (0, 1, 2, 6, 7, 8) else {40, 41})
    assert {t for _, prompt, _ in jobs for t in prompt} == {7, 8, 9, 40, 41}


def test_alternating_prompt_files_give_each_phase_the_lines_of_its_own_file(tmp_path):
    (tmp_path / "a.txt").write_text("def f(x):\n\n  return x\n")
    (tmp_path / "b.txt").write_text("Bonjour\n")
    jobs = workload(alternating(prompts_a=str(tmp_path / "a.txt"), prompts_b=str(tmp_path / "b.txt"),
                                switch_every=4, n=10))
    prompts = [p for _, p, _ in jobs]
    assert prompts[4:8] == ["Bonjour"] * 4
    assert set(prompts[:4] + prompts[8:]) == {"def f(x):", "  return x"}  # blank lines are no prompt
