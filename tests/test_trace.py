"""The Perfetto trace of a run: one track per rank, spans that never overlap on a track."""

import json

from expertmesh.config import Workload, preset
from expertmesh.deployment import Deployment
from expertmesh.engine.spec import RunSpec
from expertmesh.engine.worker import run
from expertmesh.trace import write_trace


def test_trace_has_one_track_per_rank_and_no_overlapping_spans(tmp_path):
    workload = Workload(batch_size=4, prompt_len=40, gen_len=4, seed=5)
    result = run(RunSpec(preset("tiny"), Deployment.parse("ep2pp2"), workload, seed=2, trace=True), timeout=120)
    doc = json.loads(write_trace(tmp_path / "t.json", result.spans).read_text())
    events = [e for e in doc["traceEvents"] if e["ph"] == "X"]
    names = {e["name"] for e in events}
    # every forward here has at most 40 tokens per rank: the low-latency exchange runs throughout
    assert {"attention", "route", "expert compute", "low-latency dispatch", "low-latency combine exchange",
            "pipeline recv", "sample"} <= names
    compute_tracks = {e["tid"] for e in events if e["tid"] % 2 == 0}
    assert compute_tracks == {0, 2, 4, 6}  # one per rank
    for tid in {e["tid"] for e in events}:
        spans = sorted((e["ts"], e["ts"] + e["dur"]) for e in events if e["tid"] == tid)
        assert all(end <= nxt + 1e-3 for (_, end), (nxt, _) in zip(spans, spans[1:])), tid
