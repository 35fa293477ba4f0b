"""Shared fixtures: a model small enough for a test and the cached decode that tests compare; a
command line that must fail with one error line; and the hypothesis profile of the property tests
(hypothesis is a test requirement, in the `test` extra: the property tests do not skip without it)."""

import os

import pytest
import torch

from expertmesh.cli import main
from expertmesh.config import preset
from expertmesh.model.transformer import reference_model

from hypothesis import settings

# Derandomized: every run (CI's included) draws the same examples, so a failure reproduces. Which
# examples depends on hypothesis's version too (6.170 drew a failing one 6.155 did not): the
# version is pinned in constraints.txt, so a commit's examples stay its own. A property test's
# known hard cases are `@example`s, drawn by every version. HYPOTHESIS_PROFILE=default draws new
# ones, to explore.
settings.register_profile("ci", derandomize=True, database=None)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))

# The tiny preset's architecture, shrunk further so that a test builds a model in milliseconds.
SMALL = dict(n_layers=2, n_experts=4, d_model=64, n_heads=4, head_dim=16, expert_hidden=128,
             vocab_size=128, max_seq_len=64)


@pytest.fixture(autouse=True)
def one_thread():
    """The tests' matrices are tiny: a second thread only adds synchronization (3x slower on a busy
    2-core machine). Set per test because `expertmesh run` sets the thread count itself."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(autouse=True, scope="session")
def kernel_cache(tmp_path_factory):
    """`--expert-kernel auto` caches its timings here, not in the user's ~/.cache (the ranks a
    test launches inherit the variable)."""
    os.environ["EXPERTMESH_CACHE"] = str(tmp_path_factory.mktemp("expertmesh-cache"))


@pytest.fixture
def cli_error(capfd):
    """`cli_error(argv)`: run `expertmesh argv` in this process; it must exit 2 (a ValueError,
    raised before any rank starts; 1 is a rank's failure) with nothing on stdout and one line
    `error: ...` on stderr, which is returned. capfd: a forked rank's output would show too."""

    def run(argv: list[str]) -> str:
        capfd.readouterr()
        assert main(argv) == 2
        out, err = capfd.readouterr()
        assert out == "", out
        lines = err.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: "), err
        return lines[0]

    return run


@pytest.fixture
def small_config():
    """`small_config(**overrides)`: the shrunk tiny preset (fp32)."""
    return lambda **overrides: preset("tiny", **{**SMALL, **overrides})


@pytest.fixture
def small_model(small_config):
    """`small_model(seed=0, **overrides)`: the reference model of `small_config(**overrides)`."""
    return lambda seed=0, **overrides: reference_model(small_config(**overrides), seed=seed)


@pytest.fixture
def cached_logits():
    """`cached_logits(model, ids, prompt_len, parts)`: logits of positions prompt_len-1 .. end
    `[b, 1 + L - prompt_len, V]`, from a prefill of the first `prompt_len` ids and then one id at a
    time (teacher-forced), each micro-batch of `parts` (row slices) using its rows of one cache."""

    def run(model, ids: torch.Tensor, prompt_len: int, parts: list[slice] | None = None):
        b, L = ids.shape
        parts = parts or [slice(0, b)]
        caches = model.make_caches(b, L)
        steps = []
        with torch.inference_mode():
            for start in [0, *range(prompt_len, L)]:
                end = prompt_len if start == 0 else start + 1
                steps.append(torch.cat([model(ids[p, start:end], caches, p, start) for p in parts]))
        return torch.stack(steps, dim=1)

    return run


@pytest.fixture
def naive_greedy():
    """`naive_greedy(model, prompts, n)`: n greedy tokens `[b, n]`, each the argmax of a forward
    pass over the whole sequence so far, with no cache."""

    def run(model, prompts: torch.Tensor, n: int) -> torch.Tensor:
        ids = prompts
        with torch.inference_mode():
            for _ in range(n):
                ids = torch.cat([ids, model(ids, all_logits=True)[:, -1].argmax(-1, keepdim=True)], 1)
        return ids[:, prompts.shape[1]:]

    return run
