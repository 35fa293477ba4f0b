"""`expertmesh serve` against hostile and careless clients (single deployment, the tiny Qwen2-MoE
checkpoint with its word-level tokenizer, loopback only, every process stopped by PID): raw
sockets that hold connections open, send headers or a body slowly or go idle; a prompt far too
long to fit; SIGTERM with requests that outlast `--grace`; a second server on a port whose first
server is still loading; and random request bodies from hypothesis for a bounded time.
"""

import asyncio
import json
import re
import resource
import signal
import socket
import subprocess
import sys
import threading
import time

import pytest

httpx = pytest.importorskip("httpx", reason="the server is read with httpx (pip install -e '.[serve]')")
pytest.importorskip("fastapi", reason="expertmesh serve needs the serve extra (pip install -e '.[serve]')")
transformers = pytest.importorskip("transformers", reason="the tiny checkpoint and its tokenizer are built with transformers")

from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from expertmesh.checkpoint.tiny import save_tiny_checkpoint  # noqa: E402
from expertmesh.launch import free_port  # noqa: E402
from test_reliability import FAULTY_CLI, Leftovers  # noqa: E402
from test_server import MAX_LEN, START_S, Server, Shared  # noqa: E402

# A grace of 0: any request running at SIGTERM outlasts it. With 1 s, a quiet machine finished
# the test's 240 tokens inside the grace (the stream then ended with no error event).
HEADER_S, BODY_S, KEEP_ALIVE_S, GRACE_S = 2, 2, 1, 0
MAX_CONNECTIONS = 4
NUM_BLOCKS = 64
FUZZ_S = 25.0  # the fuzz test's budget of time
FILES = 128  # the open-file limit of the out-of-descriptors test's server


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return save_tiny_checkpoint("qwen2_moe", tmp_path_factory.mktemp("ckpt") / "tinyqwen", tokenizer=True)


@pytest.fixture(scope="module")
def servers(checkpoint, tmp_path_factory):
    """single, with small connection limits and timeouts and a short grace."""
    shared = Shared(lambda: Server(
        tmp_path_factory.mktemp("logs"), "--model", str(checkpoint), "--num-blocks", str(NUM_BLOCKS),
        "--block-size", "8", "--grace", str(GRACE_S), "--timeout", "120",
        "--max-connections", str(MAX_CONNECTIONS), "--header-timeout", str(HEADER_S),
        "--body-timeout", str(BODY_S), "--keep-alive-timeout", str(KEEP_ALIVE_S)))
    yield shared
    shared.stop()


@pytest.fixture
def server(servers):
    return servers.get()


def connect(server: Server) -> socket.socket:
    return socket.create_connection(("127.0.0.1", server.port), timeout=30)


def read_until_closed(s: socket.socket) -> bytes:
    """Everything the server sends until it closes the connection."""
    data = b""
    while chunk := s.recv(65536):
        data += chunk
    return data


def timed_close(s: socket.socket) -> tuple[bytes, float]:
    """What the server sends until it closes the connection, and the seconds that took."""
    t0 = time.monotonic()
    return read_until_closed(s), time.monotonic() - t0


def wait_healthy(server: Server, within_s: float = 30) -> None:
    """Until `/health` answers 200."""
    deadline = time.monotonic() + within_s
    while True:
        try:
            if server.get("/health").status_code == 200:
                return
        except httpx.HTTPError:
            pass
        assert time.monotonic() < deadline, "the server does not answer /health"
        time.sleep(0.2)


def openai_error(raw: bytes, status: int) -> dict:
    """The `error` object of a raw HTTP response, checked to be OpenAI's shape with `status`."""
    head, _, body = raw.partition(b"\r\n\r\n")
    assert head.split(b"\r\n")[0].split(b" ")[1] == str(status).encode(), raw
    error = json.loads(body)["error"]
    assert set(error) == {"message", "type", "param", "code"} and isinstance(error["message"], str)
    return error


def test_connections_past_the_limit_get_an_openai_503_and_are_closed(server):
    lines = server.output().count("\n")
    held = [connect(server) for _ in range(MAX_CONNECTIONS)]
    try:
        time.sleep(0.3)  # accepted
        with connect(server) as extra:
            error = openai_error(read_until_closed(extra), 503)
        assert "--max-connections" in error["message"] and error["type"] == "server_error"
    finally:
        for s in held:
            s.close()
    wait_healthy(server)  # the held ones are gone: the server takes connections again
    assert server.output().count("\n") == lines, server.output()  # nothing logged


def test_out_of_file_descriptors_the_server_logs_one_line_and_recovers(checkpoint, tmp_path):
    """A server whose processes may open only `FILES` files, and more connections than that: the
    failed accepts are one warning line (asyncio's default: a traceback each second)."""
    server = Server(tmp_path, "--model", str(checkpoint), "--num-blocks", str(NUM_BLOCKS),
                    preexec_fn=lambda: resource.setrlimit(resource.RLIMIT_NOFILE, (FILES, FILES)))
    try:
        held = []
        for _ in range(FILES + 50):
            held.append(connect(server))
        time.sleep(4)  # four retries of the accept
        for s in held:
            s.close()
        wait_healthy(server)
        log = server.output()
        assert log.count("cannot accept a connection") == 1 and "Traceback" not in log, log
    finally:
        server.stop()


def test_headers_sent_slowly_get_a_408_and_the_connection_closes(server):
    with connect(server) as s:
        s.sendall(b"POST /v1/completions HTTP/1.1\r\nhost: x\r\n")

        def trickle():  # slowloris: one header line every 0.3 s, never the blank line
            try:
                for i in range(100):
                    time.sleep(0.3)
                    s.sendall(f"x-{i}: y\r\n".encode())
            except OSError:
                pass
        threading.Thread(target=trickle, daemon=True).start()
        reply, took = timed_close(s)
    assert "--header-timeout" in openai_error(reply, 408)["message"]
    assert HEADER_S - 0.1 < took < HEADER_S + 10


def test_a_body_sent_slowly_gets_a_408_and_the_connection_closes(server):
    with connect(server) as s:
        s.sendall(b'POST /v1/completions HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\n'
                  b'content-length: 100\r\n\r\n{"model": ')
        reply, took = timed_close(s)
    assert "--body-timeout" in openai_error(reply, 408)["message"]
    assert BODY_S - 0.1 < took < BODY_S + 10


def test_an_idle_keep_alive_connection_is_closed(server):
    with connect(server) as s:
        s.sendall(b"GET /health HTTP/1.1\r\nhost: x\r\n\r\n")
        reply, took = timed_close(s)
    assert reply.startswith(b"HTTP/1.1 200") and reply.endswith(b'{"status":"ok"}')
    assert KEEP_ALIVE_S - 0.1 < took < KEEP_ALIVE_S + 10


def test_a_text_prompt_too_long_to_fit_is_a_400_without_tokenizing_it(server):
    """8 MB of text: tokenized, 12 s before its 400 on a 2-core machine; refused by length, well
    under a second."""
    t0 = time.monotonic()
    r = httpx.post(server.url + "/v1/completions", timeout=120,
                   json={"model": "tinyqwen", "prompt": "w1 " * (8_000_000 // 3), "max_tokens": 1})
    took = time.monotonic() - t0
    print(f"an 8 MB prompt's 400 came after {took:.2f} s")
    error = r.json()["error"]
    assert r.status_code == 400 and error["param"] == "prompt" and "characters" in error["message"]
    chat = {"model": "tinyqwen", "max_tokens": 1,
            "messages": [{"role": "user", "content": "w1 " * (MAX_LEN * 8)}] * 2}
    r = httpx.post(server.url + "/v1/chat/completions", json=chat, timeout=120)
    assert r.status_code == 400 and r.json()["error"]["param"] == "messages"
    r = httpx.post(server.url + "/v1/completions", timeout=120,  # text that fits still works
                   json={"model": "tinyqwen", "prompt": "w1 " * 100, "max_tokens": 1})
    assert r.status_code == 200 and r.json()["usage"]["prompt_tokens"] == 100


def test_text_is_tokenized_off_the_event_loop_and_never_when_too_long(checkpoint):
    from expertmesh.server.app import CHARS_PER_TOKEN, Api, _prompt_ids
    from expertmesh.server.protocol import ApiError

    class Watched:
        """The checkpoint's tokenizer, noting the thread of every call."""

        def __init__(self):
            self.real = transformers.AutoTokenizer.from_pretrained(checkpoint)
            self.threads = []

        def __call__(self, text):
            self.threads.append(threading.get_ident())
            return self.real(text)

    tokenizer = Watched()
    api = Api("tinyqwen", 128, MAX_LEN, engine=None, scheduler=None, metrics=None, tokenizer=tokenizer)

    async def encode(text):
        return threading.get_ident(), await _prompt_ids(api, text)
    loop_thread, ids = asyncio.run(encode("w5 w6"))
    assert ids == tokenizer.real("w5 w6").input_ids
    assert tokenizer.threads and loop_thread not in tokenizer.threads
    with pytest.raises(ApiError, match="characters"):
        asyncio.run(encode("w" * (MAX_LEN * CHARS_PER_TOKEN + 1)))
    assert len(tokenizer.threads) == 1


def test_requests_outlasting_the_grace_get_an_openai_503_or_an_error_event_then_done(server):
    """Stops the server (a later test gets a new one)."""
    body = {"model": "tinyqwen", "prompt": [3] * 8, "max_tokens": 240, "temperature": 0}
    whole = {}
    thread = threading.Thread(target=lambda: whole.update(
        r=httpx.post(server.url + "/v1/completions", json=body, timeout=120)))
    thread.start()
    with httpx.stream("POST", server.url + "/v1/completions", json={**body, "stream": True}, timeout=120) as r:
        events = (line[len("data: "):] for line in r.iter_lines() if line.startswith("data: "))
        next(events)
        deadline = time.monotonic() + 30
        while server.metric("expertmesh_requests_running") < 2:
            assert time.monotonic() < deadline
            time.sleep(0.05)
        server.proc.send_signal(signal.SIGTERM)
        rest = list(events)
    thread.join(60)
    assert rest[-1] == "[DONE]"
    error = json.loads(rest[-2])["error"]
    assert error["type"] == "server_error" and "--grace" in error["message"]
    assert all("choices" in json.loads(e) for e in rest[:-2])
    r = whole["r"]
    assert r.status_code == 503 and "--grace" in r.json()["error"]["message"]
    assert server.proc.wait(60) == 0
    assert "Traceback" not in server.output() and "Error" not in server.output(), server.output()


def test_a_second_server_on_the_port_exits_2_while_the_first_still_loads(checkpoint, tmp_path):
    """The first server stalls in its warm-up (an injected fault), so it has not loaded yet: it
    holds the port already, and the second exits 2 with one line naming the port, before loading."""
    leftovers = Leftovers()
    port = free_port()
    argv = ["serve", "--model", str(checkpoint), "--port", str(port)]
    with open(tmp_path / "first.log", "w+") as log:
        first = subprocess.Popen([sys.executable, FAULTY_CLI, *argv], stdout=log, stderr=subprocess.STDOUT,
                                 env=leftovers.env(EXPERTMESH_FAULT="0:0:stall"), text=True)
        try:
            deadline = time.monotonic() + START_S
            while "stalls at step 0" not in (log.seek(0) or log.read()):
                assert first.poll() is None and time.monotonic() < deadline, log.read()
                time.sleep(0.2)
            second = subprocess.run([sys.executable, "-m", "expertmesh.cli", *argv], env=leftovers.env(),
                                    capture_output=True, text=True, timeout=START_S)
        finally:
            first.kill()
            first.wait(30)
    assert second.returncode == 2 and second.stdout == "", second
    lines = second.stderr.strip().splitlines()
    assert len(lines) == 1 and re.fullmatch(rf"error: cannot listen on 127\.0\.0\.1:{port} .*--port.*",
                                            lines[0]), lines
    assert leftovers.alive() == []


# --- random bodies against a live server ---

JSON = st.recursive(st.none() | st.booleans() | st.integers(-2**70, 2**70) | st.floats(allow_nan=False)
                    | st.text(max_size=20), lambda inner: st.lists(inner, max_size=4)
                    | st.dictionaries(st.text(max_size=8), inner, max_size=4), max_leaves=8)
WORDS = st.lists(st.integers(0, 130).map(lambda i: f"w{i}"), min_size=0, max_size=12).map(" ".join)
# Each field's values that are right, and values a careless client sends (out of range, or
# parameters not implemented).
SENSIBLE = {
    "max_tokens": st.integers(1, 6),
    "temperature": st.sampled_from([0, 0.7, 1]),
    "top_p": st.sampled_from([1, 0.9]),
    "seed": st.integers(-2**63, 2**63 - 1),
    "stop": WORDS | st.lists(WORDS, max_size=3),
    "stop_token_ids": st.lists(st.integers(0, 127), max_size=4),
    "stream": st.booleans(),
    "stream_options": st.fixed_dictionaries({"include_usage": st.booleans()}),
    "n": st.just(1),
    "logprobs": st.sampled_from([None, False]),
    "echo": st.sampled_from([None, False]),
}
WRONG = {
    "max_tokens": st.sampled_from([-1, 0, 2**31, 2**64]),
    "temperature": st.sampled_from([2.5, -1, 1e-320]),
    "top_p": st.sampled_from([0.0, 1.5]),
    "seed": st.sampled_from([2**63, -2**64]),
    "stop": st.lists(WORDS, min_size=65, max_size=70),
    "stop_token_ids": st.lists(st.integers(-5, 200), min_size=1, max_size=70),
    "stream": st.sampled_from([1, "true"]),
    "stream_options": st.sampled_from([{"include_usage": 1}, []]),
    "n": st.sampled_from([0, 2]),
    "logprobs": st.sampled_from([True, 2]),
    "echo": st.just(True),
}
PROMPT = WORDS | st.lists(st.integers(-3, 140), max_size=12) | st.lists(WORDS, max_size=2)
MESSAGES = st.lists(st.fixed_dictionaries({
    "role": st.sampled_from(["user", "system", "assistant"]),
    "content": WORDS | st.lists(st.fixed_dictionaries({"type": st.just("text"), "text": WORDS}), max_size=2)}),
    max_size=3)


def bodies(hostile: bool, required: str, value, limit: str) -> st.SearchStrategy:
    """A body with a model, `required` (usually), a length limit `limit` (always: chat's default
    is the rest of the context, seconds of CPU) and any of `SENSIBLE`'s fields; under `hostile`
    each value may also be a `WRONG` one or any JSON."""
    def field(name, strategy=None):
        strategy = SENSIBLE[name] if strategy is None else strategy
        if not hostile:
            return strategy
        return strategy | WRONG.get(name, st.just("wrong")) | JSON
    return st.fixed_dictionaries(
        {"model": field("model", st.just("tinyqwen")), limit: field("max_tokens")},
        optional={required: field(required, value), **{k: field(k) for k in SENSIBLE if k != "max_tokens"}})


REQUESTS = st.one_of(*[
    st.tuples(st.just(path), bodies(hostile, required, value, limit).map(json.dumps))
    for hostile in (False, True)
    for path, required, value, limit in (("/v1/completions", "prompt", PROMPT, "max_tokens"),
                                         ("/v1/chat/completions", "messages", MESSAGES, "max_completion_tokens"))
], st.tuples(st.sampled_from(["/v1/completions", "/v1/chat/completions"]),
             st.binary(max_size=40) | JSON.map(json.dumps) | st.text(max_size=40)))


def check_answer(path: str, r: httpx.Response, streamed: bool) -> None:
    """A well-formed OpenAI answer of `path`, or a well-formed OpenAI error with a 4xx status."""
    if r.status_code != 200:
        assert r.status_code in (400, 413, 429), (r.status_code, r.text)
        error = r.json()["error"]
        assert set(error) == {"message", "type", "param", "code"} and isinstance(error["message"], str)
        return
    kind = "text_completion" if path == "/v1/completions" else "chat.completion"
    if not streamed:
        body = r.json()
        assert body["object"] == kind and len(body["choices"]) == 1
        assert body["choices"][0]["finish_reason"] in ("stop", "length")
        assert body["usage"]["completion_tokens"] == len(body["choices"][0]["token_ids"])
        return
    events = [line[len("data: "):] for line in r.text.splitlines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]", r.text
    chunks = [json.loads(e) for e in events[:-1]]
    assert all(c["object"] == kind + ("" if kind == "text_completion" else ".chunk") for c in chunks)
    assert [c["choices"][0]["finish_reason"] for c in chunks if c["choices"]][-1] in ("stop", "length")


class TimeUp(BaseException):
    """Ends the fuzz run at its time budget: not an `Exception`, so hypothesis neither counts it a
    failure nor shrinks it, and it passes straight through."""


def test_random_bodies_get_openai_answers_or_errors_and_leak_no_kv_blocks(server):
    tried, t0 = [], time.monotonic()

    @settings(max_examples=100_000, deadline=None, suppress_health_check=list(HealthCheck))
    @given(REQUESTS)
    def one(request):
        if time.monotonic() - t0 > FUZZ_S:
            raise TimeUp
        path, content = request
        try:
            streamed = json.loads(content).get("stream") is True
        except (ValueError, AttributeError, UnicodeDecodeError):
            streamed = False
        r = httpx.post(server.url + path, content=content, timeout=120,
                       headers={"content-type": "application/json"})
        tried.append(r.status_code)
        check_answer(path, r, streamed)

    with pytest.raises(TimeUp):
        one()
    took = time.monotonic() - t0
    print(f"fuzz: {len(tried)} bodies in {took:.1f} s, answers by status: "
          f"{ {code: tried.count(code) for code in sorted(set(tried))} }")
    assert len(tried) >= 20
    r = httpx.post(server.url + "/v1/completions", timeout=60,
                   json={"model": "tinyqwen", "prompt": "w1 w2", "max_tokens": 3})
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 3
    deadline = time.monotonic() + 30  # every block free again once the last step is reported
    while (server.metric("expertmesh_kv_blocks_used", dp_rank=0),
           server.metric("expertmesh_kv_blocks_free", dp_rank=0)) != (0, NUM_BLOCKS):
        assert time.monotonic() < deadline, "KV blocks leaked"
        time.sleep(0.2)
