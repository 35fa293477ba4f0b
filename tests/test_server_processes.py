"""`expertmesh serve`'s process layout as a client and an operator see it: API server processes
apart from the engine's ranks, several of them on one port, an API key on every /v1 route, and
every process gone when any of them dies (real processes, loopback only, bounded waits).
"""

import os
import signal
import threading
import time

import pytest

openai = pytest.importorskip("openai", reason="the server is driven by the openai client (pip install -e '.[test,serve]')")
httpx = pytest.importorskip("httpx", reason="health and metrics are read with httpx (pip install -e '.[serve]')")
pytest.importorskip("zmq", reason="expertmesh serve needs the serve extra (pip install -e '.[serve]')")

from test_server import Server  # noqa: E402

KEY = "sesame"
EXIT_S = 30  # what every process gets to be gone after a death


def children(pid: int) -> list[int]:
    try:
        with open(f"/proc/{pid}/task/{pid}/children") as f:
            return [int(p) for p in f.read().split()]
    except OSError:
        return []


def frontends(server: Server) -> list[int]:
    """The API server processes: rank 0's children (rank 0 is the CLI process under `single`, its
    first child otherwise)."""
    out = []
    for pid in children(server.proc.pid) + [c for r in children(server.proc.pid) for c in children(r)]:
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                if b"expertmesh.server.frontend" in f.read():
                    out.append(pid)
        except OSError:
            pass
    return sorted(out)


def running_gauge(server: Server) -> float:
    return server.metric("expertmesh_requests_running")


@pytest.fixture(scope="module")
def keyed(tmp_path_factory):
    """single, tiny preset, two API servers, an API key, on a port the system chooses."""
    s = Server(tmp_path_factory.mktemp("logs"), "--api-server-count", "2", "--api-key", KEY,
               "--num-blocks", "64", "--timeout", "60", "--port", "0")
    s.client = openai.OpenAI(base_url=s.url + "/v1", api_key=KEY, max_retries=0, timeout=60)
    yield s
    s.stop()


@pytest.mark.parametrize("method, path, body", [
    ("GET", "/v1/models", None),
    ("POST", "/v1/completions", {"model": "tiny", "prompt": [1, 2], "max_tokens": 2}),
    ("POST", "/v1/chat/completions", {"model": "tiny", "messages": [{"role": "user", "content": "hi"}]}),
])
def test_every_v1_route_wants_the_api_key_and_health_and_metrics_do_not(keyed, method, path, body):
    for headers in ({}, {"authorization": "Bearer wrong"}, {"authorization": KEY}):
        r = httpx.request(method, keyed.url + path, json=body, headers=headers, timeout=30)
        assert r.status_code == 401, (headers, r.text)
        assert r.json()["error"]["code"] == "invalid_api_key"
        assert r.json()["error"]["type"] == "invalid_request_error"
    r = httpx.request(method, keyed.url + path, json=body, headers={"authorization": f"Bearer {KEY}"},
                      timeout=30)
    assert r.status_code != 401
    assert keyed.get("/health").status_code == 200 and keyed.get("/metrics").status_code == 200


def test_port_0_prints_the_port_the_server_listens_on(keyed):
    assert keyed.port != 0 and keyed.get("/health").status_code == 200


def test_two_api_servers_each_reach_the_engine_and_metrics_count_both(keyed):
    pids = frontends(keyed)
    assert len(pids) == 2
    served = keyed.metric("expertmesh_requests_total", outcome="length")
    tokens = []
    for paused in pids:  # the other one alone accepts while this one is stopped
        os.kill(paused, signal.SIGSTOP)
        try:
            # A new connection (no pooled one, which the stopped process may hold)
            r = httpx.post(keyed.url + "/v1/completions", headers={"authorization": f"Bearer {KEY}"},
                           timeout=60, json={"model": "tiny", "prompt": [5, 6, 7], "max_tokens": 4,
                                             "temperature": 0})
            tokens.append(r.json()["choices"][0]["token_ids"])
        finally:
            os.kill(paused, signal.SIGCONT)
    assert tokens[0] == tokens[1] and len(tokens[0]) == 4
    for _ in range(4):  # whichever process answers, /metrics counts both processes' requests
        assert keyed.metric("expertmesh_requests_total", outcome="length") == served + 2


def test_engine_killed_the_open_request_gets_503_and_the_api_servers_exit(tmp_path):
    s = Server(tmp_path, "--api-server-count", "2", "--num-blocks", "64", "--timeout", "60")
    try:
        pids = frontends(s)
        outcome = {}

        def ask():
            try:
                s.client.completions.create(model="tiny", prompt=[1] * 8, max_tokens=500, temperature=0)
            except openai.APIStatusError as exc:
                outcome["status"] = exc.status_code
        asker = threading.Thread(target=ask)
        asker.start()
        deadline = time.monotonic() + 30
        while running_gauge(s) == 0:
            assert time.monotonic() < deadline
            time.sleep(0.1)
        s.proc.kill()  # rank 0 (under `single`, the CLI process itself)
        asker.join(EXIT_S)
        assert outcome == {"status": 503}
        deadline = time.monotonic() + EXIT_S
        while any(os.path.exists(f"/proc/{p}") and open(f"/proc/{p}/stat").read().split()[2] != "Z"
                  for p in pids):
            assert time.monotonic() < deadline, "an API server outlived the engine"
            time.sleep(0.2)
    finally:
        s.stop()


def test_api_server_killed_every_rank_exits_nonzero(tmp_path):
    s = Server(tmp_path, "--deployment", "ep2", "--num-blocks", "64", "--timeout", "60")
    try:
        os.kill(frontends(s)[0], signal.SIGKILL)
        assert s.proc.wait(EXIT_S) == 1
        assert "API server 0 exited with code -9" in s.output()
    finally:
        s.stop()
