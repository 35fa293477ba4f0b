"""The simulator against the published H100 / H200 measurements (benchmarks/sim_vs_published.py):
every row is computed, and the accuracy measured when the constants were set is kept."""

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # `benchmarks` is a repository folder

from benchmarks import sim_vs_published  # noqa: E402


@pytest.fixture(scope="module")
def table():
    return sim_vs_published.rows()


def test_every_row_has_a_positive_prediction_and_its_error(table):
    assert len(table) == 65
    for r in table:
        assert r["predicted"] > 0 and r["published"] > 0
        assert r["error"] == pytest.approx(r["predicted"] / r["published"] - 1)
    assert {r["kind"] for r in table} == {"fit", "held-out"}


def test_accuracy_stays_where_it_was_measured(table):
    # measured: all rows median 12%, held-out median 22%; 2 of 65 rows beyond 2x, both listed
    # as known misses (FP8 GEMM at 1024, Qwen3-235B)
    stats = sim_vs_published.summary(table)
    assert stats["all"]["median_abs_error"] <= 0.15
    assert stats["held-out"]["median_abs_error"] <= 0.25
    beyond = {r["what"] for r in table if max(r["predicted_over_published"], 1 / r["predicted_over_published"]) > 2}
    assert beyond == {"FP8 GEMM m=n=k=1024", "Qwen3-235B-A22B DP+EP8 1000/1000 per GPU"}


def test_wide_ep_deepseek_v3_rows_stay_where_they_were_measured(table):
    """SGLang's 96-H100 DeepSeek-V3 runs (held out: no constant came from them): measured prefill
    EP32 -14% / -9% / -1% at 1K / 2K / 4K (-16% against the perfect-EPLB 4K run), decode EP72 +25%."""
    wide = {r["what"]: r["error"] for r in table if r["group"] == "wide-ep"}
    assert len(wide) == 5 and all(r["kind"] == "held-out" for r in table if r["group"] == "wide-ep")
    assert all(abs(e) < 0.3 for e in wide.values()), wide
    assert wide["SGLang DeepSeek-V3 decode EP72 256 seqs/GPU, KV 2000, per node"] > 0  # balanced experts: optimistic


def test_fitted_curves_reproduce_the_rows_they_came_from(table):
    fit = [r for r in table if r["kind"] == "fit"]
    assert max(abs(r["error"]) for r in fit) < 0.2
