"""`benchmarks/serving.py` at its smallest size: a real `expertmesh serve` checked against
transformers' greedy text, then loaded at two rates; a peer that cannot run is skipped with its
reason (here on purpose, to keep the suite short: the peer's path runs in the benchmark itself)."""

import math
import sys
from pathlib import Path

import pytest

pytest.importorskip("fastapi", reason="expertmesh serve needs the serve extra (pip install -e '.[serve]')")
pytest.importorskip("openai")
pytest.importorskip("transformers")

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # `benchmarks` is a folder of the repository

from benchmarks import serving  # noqa: E402


def test_serving_section_measures_expertmesh_and_reports_a_missing_peer(monkeypatch):
    monkeypatch.setattr(serving, "peer_missing", lambda: "not installed (test)")
    sec = serving.serving_section("smoke")
    assert sec["status"] == "ok"
    rows = sec["rows"]
    assert [(r["server"], r["rate"]) for r in rows] == [("expertmesh single", "2/s"),
                                                        ("expertmesh single", "all at once")]
    for r in rows:
        assert r["agrees"] == "yes" and r["failed"] == 0
        assert r["out_tps"] > 0 and r["ttft_ms"] > 0 and r["tpot_ms"] > 0
        assert "ratio" not in r  # nothing to compare with
    assert any("transformers serve skipped: not installed (test)" in n for n in sec["notes"])


def test_transformers_serve_agrees_with_transformers_greedy_and_is_measured(tmp_path):
    """The peer's own path: `transformers serve --continuous-batching` started, checked against
    transformers' greedy text and loaded once (2 requests at once), on the tiny checkpoint."""
    reason = serving.peer_missing()
    if reason:
        pytest.skip(f"transformers serve cannot run here: {reason}")
    size = serving.Size({}, num_prompts=2, input_len=(4, 8), output_len=4, rates=(math.inf,), deployments=())
    data = serving.measure(size, tmp_path)
    assert list(data["results"]) == ["transformers"] and data["peer_skipped"] is None
    entry = data["results"]["transformers"]
    assert "error" not in entry, entry
    assert entry["greedy_agrees"]
    run = entry["runs"]["inf"]
    assert run["failed"] == 0 and run["output_token_throughput"] > 0


def test_step_time_section_compares_the_engine_alone_with_the_same_batch_behind_the_server():
    sec = serving.step_section("smoke")
    assert sec["status"] == "ok"
    (row,) = sec["rows"]
    assert row["failed"] == 0 and row["alone_ms"] > 0 and row["behind_ms"] > 0
    assert row["ratio"] == row["behind_ms"] / row["alone_ms"]
