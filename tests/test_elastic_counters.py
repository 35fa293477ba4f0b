"""A rank that dies between a step and the counters' collective after it (`expertmesh serve
--elastic`, `server/rank_counters.py: share_counters`, every `STATS_EVERY` steps): rank 0 has the
step's tokens in hand when the collective fails, and must still stream them. Once it recorded them
as streamed before the collective and lost them in the recovery: one token missing from every
stream, seen in about 1 of 8 runs of `test_elastic.py`'s kill mid-stream, when the SIGKILL
happened to land there. Here the test-only fault `counters` (`expertmesh/faults.py`) kills rank 3
on entering that collective, the first time it holds a request, so the timing is no longer luck:
a real ep4 server (four local CPU ranks over gloo), streams checked token for token against the
tiny preset's single-device model.
"""

import re

import pytest

from expertmesh import faults

from elastic_streams import Streams, prompts, reference, wait_health  # noqa: F401 (fixture)

pytest.importorskip("openai", reason="the server is driven by the openai client (pip install -e '.[test,serve]')")
from test_elastic import COMMON  # noqa: E402
from test_elastic_hang import FAULTY_CLI  # noqa: E402
from test_server import Server  # noqa: E402


def test_rank_3_killed_in_the_counters_collective_after_a_step_loses_no_token(tmp_path, reference):
    """Rank 3, so that no survivor takes its number (the fault names a rank by its current one)."""
    s = Server(tmp_path, *COMMON, cli=(FAULTY_CLI,), env={faults.ENV: "3:0:counters"})
    try:
        streams = Streams(s, prompts(6, 12, 5), max_tokens=24)
        streams.check(reference)
        log = s.output()
        assert "rank 3 failed: process died from signal SIGKILL" in log, log[-4000:]
        assert re.search(r"elastic: lost rank 3 \(.*SIGKILL\); now ep3", log), log[-4000:]
        body = wait_health(s, degraded=True)
        assert [r["state"] for r in body["ranks"]] == ["ok", "ok", "ok", "dead"]
        assert s.metric("expertmesh_rank_losses_total") == 1
    finally:
        s.stop()
