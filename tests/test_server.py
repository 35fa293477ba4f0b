"""`expertmesh serve` as a client sees it: a real server (ep2: two local ranks) on a free loopback
port, driven by the official `openai` client, on a tiny random Qwen2-MoE checkpoint with a
word-level tokenizer. Greedy outputs must equal transformers' own greedy decoding of each request
alone; bad requests get a 400 naming the field and the server keeps serving; a full queue gets a
429 at once; a client that leaves before its answer ends (streamed or not) has its request
aborted and its KV blocks freed;
SIGTERM ends the server gracefully with exit 0, a killed rank ends it with an error, and neither
leaves a process.

Two servers per module, each shared by several tests; a test that stops one gets it started
again for the next (`Shared`), so that the tests run in any order.
"""

import json
import os
import random
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

openai = pytest.importorskip("openai", reason="the server is driven by the openai client (pip install -e '.[test,serve]')")
httpx = pytest.importorskip("httpx", reason="health and metrics are read with httpx (pip install -e '.[serve]')")
pytest.importorskip("fastapi", reason="expertmesh serve needs the serve extra (pip install -e '.[serve]')")
transformers = pytest.importorskip("transformers", reason="the tiny checkpoint and its tokenizer are built with transformers")

from expertmesh.checkpoint.tiny import reference_greedy, save_tiny_checkpoint  # noqa: E402
from expertmesh.launch import free_port  # noqa: E402
from expertmesh.server.bench import BenchConfig, workload  # noqa: E402
from expertmesh.server.rank_counters import STATS_EVERY  # noqa: E402
from test_reliability import Leftovers  # noqa: E402

START_S = 240  # a server's start-up on a loaded 2-core machine: imports, two ranks, warm-up
MAX_LEN = 256  # the checkpoint's max_position_embeddings


class Server:
    """`expertmesh serve ...` in a subprocess whose descendants carry a tag."""

    def __init__(self, tmp, *args, preexec_fn=None, cli=("-m", "expertmesh.cli"), env=None):
        """`cli`: how python starts the CLI (tests/faulty_cli.py for fault injection); `env`:
        more environment variables (EXPERTMESH_FAULT)."""
        self.leftovers = Leftovers()
        self.env = self.leftovers.env(**(env or {}))
        self.port = free_port()
        self.log = open(tmp / f"server_{self.port}.log", "w+")
        self.proc = subprocess.Popen([sys.executable, *cli, "serve", "--port",
                                      str(self.port), *args], env=self.env, stdout=self.log,
                                     preexec_fn=preexec_fn,
                                     stderr=subprocess.STDOUT, text=True)
        deadline = time.monotonic() + START_S
        while "ready at" not in self.output():
            assert self.proc.poll() is None, f"the server exited: {self.output()}"
            assert time.monotonic() < deadline, f"no ready line in {START_S} s: {self.output()}"
            time.sleep(0.2)
        self.port = int(re.search(r"ready at http://127\.0\.0\.1:(\d+)/v1", self.output()).group(1))
        self.url = f"http://127.0.0.1:{self.port}"
        self.client = openai.OpenAI(base_url=self.url + "/v1", api_key="none", max_retries=0, timeout=120)

    def output(self) -> str:
        self.log.seek(0)
        return self.log.read()

    def ranks(self) -> list[int]:
        """The rank processes, rank 0 first (forked in rank order)."""
        pid = self.proc.pid
        with open(f"/proc/{pid}/task/{pid}/children") as f:
            return sorted(int(p) for p in f.read().split())

    def get(self, path: str) -> httpx.Response:
        return httpx.get(self.url + path, timeout=30)

    def metric(self, name: str, **labels) -> float:
        want = ",".join(f'{k}="{v}"' for k, v in sorted(labels.items()))
        for line in self.get("/metrics").text.splitlines():
            key, _, value = line.rpartition(" ")
            if key == (f"{name}{{{want}}}" if labels else name):
                return float(value)
        raise KeyError(f"{name} {labels} not in /metrics")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(30)
        self.log.close()
        # Its API servers see rank 0 gone within PARENT_POLL_S, drain for DRAIN_S, then stop
        # uvicorn: seconds at most, but at a load of 15 on 2 cores more than 5 s was seen.
        assert self.leftovers.alive(wait_s=30) == []


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return save_tiny_checkpoint("qwen2_moe", tmp_path_factory.mktemp("ckpt") / "tinyqwen", tokenizer=True)


@pytest.fixture(scope="module")
def hf_model(checkpoint):
    return transformers.AutoModelForCausalLM.from_pretrained(checkpoint, dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def tokenizer(checkpoint):
    return transformers.AutoTokenizer.from_pretrained(checkpoint)


class Shared:
    """A server that the tests of a module share, started by `start()` when a test first needs it
    and again after a test stopped it: any test runs alone, or in any order."""

    def __init__(self, start):
        self.start, self.current = start, None

    def get(self) -> Server:
        if self.current is not None and self.current.proc.poll() is not None:
            self.current.stop()
            self.current = None
        if self.current is None:
            self.current = self.start()
        return self.current

    def stop(self) -> None:
        """As an operator would (SIGTERM), then `Server.stop`."""
        if self.current is not None:
            if self.current.proc.poll() is None:
                self.current.proc.send_signal(signal.SIGTERM)
                self.current.proc.wait(120)
            self.current.stop()


@pytest.fixture(scope="module")
def servers(checkpoint, tmp_path_factory):
    """ep2 with a small KV pool and token budget, so that 32 requests queue, chunk and share steps."""
    shared = Shared(lambda: Server(tmp_path_factory.mktemp("logs"), "--model", str(checkpoint),
                                   "--deployment", "ep2", "--num-blocks", "96", "--block-size", "8",
                                   "--max-batched-tokens", "64", "--max-seqs", "12", "--grace", "60",
                                   "--timeout", "120"))
    yield shared
    shared.stop()


@pytest.fixture
def server(servers):
    return servers.get()


def expected(hf_model, prompt: list[int], n: int) -> list[int]:
    return reference_greedy(hf_model, torch.tensor([prompt]), n)[0][0].tolist()


def test_token_id_completion_is_transformers_greedy_with_usage(server, hf_model):
    prompt = [5, 17, 99, 3, 64, 2]
    r = server.client.completions.create(model="tinyqwen", prompt=prompt, max_tokens=9, temperature=0)
    choice = r.choices[0]
    assert choice.token_ids == expected(hf_model, prompt, 9)
    assert choice.finish_reason == "length"
    assert (r.usage.prompt_tokens, r.usage.completion_tokens, r.usage.total_tokens) == (6, 9, 15)


def test_text_completion_streamed_equals_unstreamed_and_decodes_the_reference(server, hf_model, tokenizer):
    prompt = "w5 w17 w99 w3"
    whole = server.client.completions.create(model="tinyqwen", prompt=prompt, max_tokens=7, temperature=0)
    want = expected(hf_model, tokenizer(prompt).input_ids, 7)
    assert whole.choices[0].token_ids == want
    assert whole.choices[0].text == tokenizer.decode(want, skip_special_tokens=True)
    chunks = list(server.client.completions.create(model="tinyqwen", prompt=prompt, max_tokens=7,
                                                   temperature=0, stream=True,
                                                   stream_options={"include_usage": True}))
    assert "".join(c.choices[0].text for c in chunks if c.choices) == whole.choices[0].text
    assert [t for c in chunks if c.choices for t in c.choices[0].token_ids] == want
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 7


def test_chat_renders_the_template_streamed_and_not(server, hf_model, tokenizer):
    messages = [{"role": "system", "content": "w1 w2"}, {"role": "user", "content": "w40 w41 w42"}]
    ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_dict=True)["input_ids"]
    want = tokenizer.decode(expected(hf_model, list(ids), 6), skip_special_tokens=True)
    r = server.client.chat.completions.create(model="tinyqwen", messages=messages, max_tokens=6, temperature=0)
    assert r.choices[0].message.role == "assistant" and r.choices[0].message.content == want
    assert r.usage.prompt_tokens == len(ids)
    stream = server.client.chat.completions.create(model="tinyqwen", messages=messages, max_tokens=6,
                                                   temperature=0, stream=True)
    assert "".join(c.choices[0].delta.content or "" for c in stream) == want


def test_stop_strings_and_stop_token_ids_end_generation_with_reason_stop(server, hf_model, tokenizer):
    prompt = "w7 w8 w9"
    full = expected(hf_model, tokenizer(prompt).input_ids, 8)
    word = f"w{full[3]}"
    r = server.client.completions.create(model="tinyqwen", prompt=prompt, max_tokens=8, temperature=0,
                                         stop=[word])
    text = tokenizer.decode(full, skip_special_tokens=True)
    assert r.choices[0].finish_reason == "stop"
    assert r.choices[0].text == text[:text.index(word)]
    r = server.client.completions.create(model="tinyqwen", prompt=prompt, max_tokens=8, temperature=0,
                                         extra_body={"stop_token_ids": [full[2]]})
    cut = full.index(full[2])
    assert r.choices[0].token_ids == full[:cut + 1] and r.choices[0].finish_reason == "stop"


def test_32_concurrent_requests_each_get_the_tokens_of_the_request_alone(server, hf_model):
    rng = random.Random(4)
    jobs = [([rng.randrange(1, 128) for _ in range(rng.randint(1, 60))], rng.randint(1, 12), i % 2 == 1)
            for i in range(32)]

    def ask(job):
        prompt, n, stream = job
        r = server.client.completions.create(model="tinyqwen", prompt=prompt, max_tokens=n,
                                             temperature=0, stream=stream)
        return [t for c in r for t in c.choices[0].token_ids] if stream else r.choices[0].token_ids

    with ThreadPoolExecutor(32) as pool:
        got = list(pool.map(ask, jobs))
    for (prompt, n, _), tokens in zip(jobs, got):
        assert tokens == expected(hf_model, prompt, n), f"prompt length {len(prompt)}, {n} tokens"
    assert server.metric("expertmesh_kv_blocks_used", dp_rank=0) == 0
    assert server.metric("expertmesh_kv_blocks_used", dp_rank=1) == 0


COMPLETION_400 = [
    ({"model": "gpt-4", "prompt": [1, 2]}, "model"),
    ({"model": "tinyqwen"}, "prompt"),
    ({"model": "tinyqwen", "prompt": [1, 2], "max_tokens": -3}, "max_tokens"),
    ({"model": "tinyqwen", "prompt": [1, 2], "max_tokens": 0}, "max_tokens"),
    ({"model": "tinyqwen", "prompt": [1] * (MAX_LEN - 4), "max_tokens": 10}, "prompt"),
    ({"model": "tinyqwen", "prompt": [1, 2], "temperature": 2.5}, "temperature"),
    ({"model": "tinyqwen", "prompt": [1, 2], "temperature": -0.5}, "temperature"),
    ({"model": "tinyqwen", "prompt": [1, 2], "top_p": 0}, "top_p"),
    ({"model": "tinyqwen", "prompt": [1, 2], "top_p": 1.5}, "top_p"),
    ({"model": "tinyqwen", "prompt": [1, 2], "n": 0}, "n"),
    ({"model": "tinyqwen", "prompt": [1, 500]}, "prompt"),
    ({"model": "tinyqwen", "prompt": ["w1", "w2"]}, "prompt"),
    ({"model": "tinyqwen", "prompt": [[1], [2]]}, "prompt"),
    ({"model": "tinyqwen", "prompt": ""}, "prompt"),
    ({"model": "tinyqwen", "prompt": []}, "prompt"),
    ({"model": "tinyqwen", "prompt": [True, False]}, "prompt"),
    ({"model": "tinyqwen", "prompt": "w1 \ud800"}, "prompt"),
    ({"model": "tinyqwen", "prompt": [1, 2], "max_tokens": "4"}, "max_tokens"),
    ({"model": "tinyqwen", "prompt": [1, 2], "max_tokens": 4.0}, "max_tokens"),
    ({"model": "tinyqwen", "prompt": [1, 2], "max_tokens": True}, "max_tokens"),
    ({"model": "tinyqwen", "prompt": [1, 2], "seed": 2**63}, "seed"),
    ({"model": "tinyqwen", "prompt": [1, 2], "seed": -2**63 - 1}, "seed"),
    ({"model": "tinyqwen", "prompt": [1, 2], "logprobs": 21}, "logprobs"),
    ({"model": "tinyqwen", "prompt": [1, 2], "echo": True}, "echo"),
    ({"model": "tinyqwen", "prompt": [1, 2], "presence_penalty": 2.5}, "presence_penalty"),
    ({"model": "tinyqwen", "prompt": [1, 2], "frequency_penalty": -3}, "frequency_penalty"),
    ({"model": "tinyqwen", "prompt": [1, 2], "logit_bias": {"5": 101}}, "logit_bias"),
    ({"model": "tinyqwen", "prompt": [1, 2], "stop": ["w1"] * 65}, "stop"),
    ({"model": "tinyqwen", "prompt": [1, 2], "stop": ["w" * 2000] * 3}, "stop"),
    ({"model": "tinyqwen", "prompt": [1, 2], "stop_token_ids": [1] * 65}, "stop_token_ids"),
]
HI = [{"role": "user", "content": "w1"}]
CHAT_400 = [
    ({"model": "gpt-4", "messages": HI}, "model"),
    ({"model": "tinyqwen"}, "messages"),
    ({"model": "tinyqwen", "messages": []}, "messages"),
    ({"model": "tinyqwen", "messages": [{"content": "w1"}]}, "messages"),
    ({"model": "tinyqwen", "messages": [{"role": "user", "content": 5}]}, "messages"),
    ({"model": "tinyqwen", "messages": HI, "max_tokens": 0}, "max_tokens"),
    ({"model": "tinyqwen", "messages": HI, "max_tokens": MAX_LEN}, "prompt"),
    ({"model": "tinyqwen", "messages": HI, "temperature": 3}, "temperature"),
    ({"model": "tinyqwen", "messages": HI, "top_p": 1.5}, "top_p"),
    ({"model": "tinyqwen", "messages": HI, "n": 129}, "n"),
    ({"model": "tinyqwen", "messages": HI, "stop_token_ids": [1, 500]}, "stop_token_ids"),
    ({"model": "tinyqwen", "messages": HI, "max_completion_tokens": 0}, "max_completion_tokens"),
    ({"model": "tinyqwen", "messages": HI, "top_logprobs": 2}, "top_logprobs"),
    ({"model": "tinyqwen", "messages": HI, "response_format": {"type": "json_object"}}, "response_format"),
    ({"model": "tinyqwen", "messages": HI, "tools": [{"type": "function", "function": {"name": "f"}}]}, "tools"),
]


@pytest.mark.parametrize("path, body, param", [("/completions", b, p) for b, p in COMPLETION_400] +
                         [("/chat/completions", b, p) for b, p in CHAT_400])
def test_invalid_request_is_a_400_naming_the_field_and_the_server_keeps_serving(server, path, body, param):
    r = httpx.post(server.url + "/v1" + path, content=json.dumps(body),  # ASCII: "\ud800" escaped
                   headers={"content-type": "application/json"}, timeout=60)
    assert r.status_code == 400
    error = r.json()["error"]
    assert error["param"] == param and error["type"] == "invalid_request_error"
    if body.get("max_tokens") in (0, -3):  # refused by the body's schema, not taken as "the default"
        assert error["message"].startswith("max_tokens: Input should be greater than or equal to 1")
    assert server.get("/health").status_code == 200
    r = server.client.completions.create(model="tinyqwen", prompt=[1, 2], max_tokens=2, temperature=0)
    assert len(r.choices[0].token_ids) == 2


@pytest.mark.parametrize("content", [b'{"model": "tinyqwen", "prompt": [1,', b'{"model": "tinyqwen\xff\xfe"}',
                                     b'{"a": ' * 100_000 + b'1' + b'}' * 100_000])
def test_malformed_non_utf8_or_too_deep_json_is_an_openai_400(server, content):
    r = httpx.post(server.url + "/v1/completions", content=content,
                   headers={"content-type": "application/json"}, timeout=30)
    assert r.status_code == 400 and "not valid JSON" in r.json()["error"]["message"]
    assert r.json()["error"]["type"] == "invalid_request_error"


@pytest.mark.parametrize("chunked", [False, True])
def test_a_body_over_the_limit_is_an_openai_413(server, chunked):
    body = json.dumps({"model": "tinyqwen", "prompt": "w1 " * (3 << 20)}).encode()
    content = (body[i:i + (1 << 20)] for i in range(0, len(body), 1 << 20)) if chunked else body
    r = httpx.post(server.url + "/v1/completions", timeout=60, content=content,
                   headers={"content-type": "application/json"})
    assert r.status_code == 413 and "--max-body-mb" in r.json()["error"]["message"]


def test_neutral_values_of_unimplemented_parameters_are_accepted(server):
    r = server.client.post("/completions", cast_to=object, body={
        "model": "tinyqwen", "prompt": [1, 2], "max_tokens": 2, "temperature": 0, "logprobs": None,
        "echo": False, "presence_penalty": 0, "frequency_penalty": 0.0, "logit_bias": {}})
    assert len(r["choices"][0]["token_ids"]) == 2


def test_chat_honours_max_completion_tokens_and_an_empty_stop_string_stops_nothing(server):
    r = server.client.chat.completions.create(model="tinyqwen", messages=HI, max_completion_tokens=2,
                                              max_tokens=50, temperature=0)
    assert r.usage.completion_tokens == 2 and r.choices[0].finish_reason == "length"
    r = server.client.completions.create(model="tinyqwen", prompt="w1 w2", max_tokens=5, temperature=0, stop="")
    assert r.usage.completion_tokens == 5 and r.choices[0].finish_reason == "length"


def test_models_health_and_metrics(server):
    # Enough steps of its own for the ranks' counters to arrive (every 16 steps).
    server.client.completions.create(model="tinyqwen", prompt=[1, 2, 3], max_tokens=20, temperature=0)
    models = server.client.models.list()
    assert [m.id for m in models.data] == ["tinyqwen"]
    assert server.get("/health").json() == {"status": "ok"}
    assert server.metric("expertmesh_requests_total", outcome="length") > 0
    assert server.metric("expertmesh_ttft_seconds_count") > 0
    deadline = time.monotonic() + 60  # the ranks' counters arrive every few steps
    while sum(server.metric("expertmesh_expert_tokens_total", layer=0, expert=e) for e in range(4)) == 0:
        assert time.monotonic() < deadline
        time.sleep(0.5)
    assert server.metric("expertmesh_load_imbalance") >= 1.0
    assert server.metric("expertmesh_exchanged_bytes_total") > 0


def router_counts(hf_model, prompts: list[list[int]]) -> torch.Tensor:
    """transformers' layer-0 router: how many of the prompts' tokens pick each expert (top-2)."""
    counts = torch.zeros(4)
    with torch.no_grad():
        for prompt in prompts:
            logits = hf_model(torch.tensor([prompt]), output_router_logits=True).router_logits[0]
            counts += torch.bincount(logits.topk(2, dim=-1).indices.flatten(), minlength=4)
    return counts


def test_the_alternating_bench_phases_load_the_experts_differently(server, hf_model):
    """`bench serve --dataset alternating` with ids 1..16 in phase A and 64..79 in phase B: each
    phase's routed tokens per expert of layer 0 on /metrics are transformers' router's over the
    phase's prompts, give or take the requests that push the counters out between phases, and one
    expert's share of them moves by more than 0.1 between the phases."""
    cfg = BenchConfig(url=server.url + "/v1", num_prompts=24, rate=float("inf"), input_len=(32, 64),
                      output_len=(1, 1), dataset="alternating", switch_every=12, tokens_a=(1, 16),
                      tokens_b=(64, 79))
    jobs = workload(cfg)

    def flush() -> None:  # STATS_EVERY + 1 steps: the counters of every step before reach /metrics
        server.client.completions.create(model="tinyqwen", prompt=[100], max_tokens=STATS_EVERY + 1,
                                         temperature=0)

    def counts() -> torch.Tensor:
        return torch.tensor([server.metric("expertmesh_expert_tokens_total", layer=0, expert=e) for e in range(4)])

    def prefill(prompt) -> None:
        server.client.completions.create(model="tinyqwen", prompt=prompt, max_tokens=1, temperature=0)

    flush()
    measured, want = [], []
    for phase in (jobs[:12], jobs[12:]):
        before = counts()
        with ThreadPoolExecutor(12) as pool:
            list(pool.map(prefill, [prompt for _, prompt, _ in phase]))
        flush()
        measured.append(counts() - before)
        want.append(router_counts(hf_model, [prompt for _, prompt, _ in phase]))
    flushes = 2 * (STATS_EVERY + 1) * 2  # the two flushes' tokens either side of a phase, top-2 each
    for got, expected in zip(measured, want):
        assert (got - expected).abs().sum() <= flushes + 4, (got, expected)  # 4: near ties
    shares = [m / m.sum() for m in measured]
    assert (shares[0] - shares[1]).abs().max() > 0.1, shares


def test_a_repeated_prompt_reports_its_cached_tokens_in_usage_and_metrics(server, hf_model):
    """The block size is 8: the second request finds the first 24 of its 27 prompt tokens (three
    full blocks; the last token is always computed) on the DP rank that cached them."""
    prompt = [(7 * i + 3) % 120 + 1 for i in range(27)]
    hits = [server.metric("expertmesh_prefix_cache_hits_total", dp_rank=d) for d in (0, 1)]
    first = server.client.completions.create(model="tinyqwen", prompt=prompt, max_tokens=3, temperature=0)
    again = server.client.completions.create(model="tinyqwen", prompt=prompt, max_tokens=3, temperature=0)
    assert first.usage.prompt_tokens_details.cached_tokens == 0
    assert again.usage.prompt_tokens_details.cached_tokens == 24
    assert again.choices[0].token_ids == first.choices[0].token_ids == expected(hf_model, prompt, 3)
    deadline = time.monotonic() + 30  # metrics follow the engine's steps
    while sum(server.metric("expertmesh_prefix_cache_hits_total", dp_rank=d) for d in (0, 1)) - sum(hits) < 24:
        assert time.monotonic() < deadline
        time.sleep(0.2)
    assert server.metric("expertmesh_prefix_cache_queries_total", dp_rank=0) + \
        server.metric("expertmesh_prefix_cache_queries_total", dp_rank=1) >= 54


def wait_for_abort(server, aborted: float) -> None:
    """Until one more request was aborted than `aborted` and every KV block is free."""
    deadline = time.monotonic() + 30
    while server.metric("expertmesh_requests_total", outcome="abort") == aborted or \
            server.metric("expertmesh_kv_blocks_used", dp_rank=0) + \
            server.metric("expertmesh_kv_blocks_used", dp_rank=1) > 0:
        assert time.monotonic() < deadline, "the request was not aborted"
        time.sleep(0.2)


def test_client_that_leaves_mid_stream_has_its_request_aborted_and_blocks_freed(server):
    aborted = server.metric("expertmesh_requests_total", outcome="abort")
    with httpx.stream("POST", server.url + "/v1/completions", timeout=60,
                      json={"model": "tinyqwen", "prompt": [3] * 40, "max_tokens": 200,
                            "temperature": 0, "stream": True}) as r:
        lines = (line for line in r.iter_lines() if line.startswith("data:"))
        for _ in range(3):
            next(lines)
        used = server.metric("expertmesh_kv_blocks_used", dp_rank=0) + \
            server.metric("expertmesh_kv_blocks_used", dp_rank=1)
        assert used > 0
    wait_for_abort(server, aborted)


def test_client_that_leaves_before_a_whole_answer_has_its_request_aborted_and_blocks_freed(server):
    aborted = server.metric("expertmesh_requests_total", outcome="abort")
    body = json.dumps({"model": "tinyqwen", "prompt": [3] * 40, "max_tokens": 200, "temperature": 0})
    with socket.create_connection(("127.0.0.1", server.port), timeout=30) as client:
        client.sendall(f"POST /v1/completions HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\n"
                       f"content-length: {len(body)}\r\n\r\n{body}".encode())
        deadline = time.monotonic() + 30
        while server.metric("expertmesh_requests_running") == 0:
            assert time.monotonic() < deadline, "the request never ran"
            time.sleep(0.1)
    wait_for_abort(server, aborted)


def test_sigterm_lets_in_flight_requests_finish_then_stops_listening_and_exits_0(server, hf_model):
    """Stops the module's server (a later test gets a new one)."""
    prompt = [9, 8, 7]
    stream = server.client.completions.create(model="tinyqwen", prompt=prompt, max_tokens=60,
                                              temperature=0, stream=True)
    tokens = list(next(iter(stream)).choices[0].token_ids)
    server.proc.send_signal(signal.SIGTERM)
    tokens += [t for c in stream for t in c.choices[0].token_ids]
    assert tokens == expected(hf_model, prompt, 60)
    assert server.proc.wait(60) == 0, server.output()
    with pytest.raises(httpx.ConnectError):
        server.get("/health")
    assert server.leftovers.alive() == []


@pytest.fixture(scope="module")
def small_servers(checkpoint, tmp_path_factory):
    """ep2 on the checkpoint without its tokenizer (as a preset: token ids only), one running
    sequence per EP rank and one waiting request at most."""
    bare = tmp_path_factory.mktemp("bare") / "bare"
    shutil.copytree(checkpoint, bare, ignore=shutil.ignore_patterns("tokenizer*"))
    shared = Shared(lambda: Server(tmp_path_factory.mktemp("logs"), "--model", str(bare), "--deployment",
                                   "ep2", "--num-blocks", "64", "--max-seqs", "1", "--max-waiting", "1",
                                   "--timeout", "60"))
    yield shared
    shared.stop()


@pytest.fixture
def small_server(small_servers):
    return small_servers.get()


def test_text_needs_a_tokenizer(small_server):
    with pytest.raises(openai.BadRequestError, match="no tokenizer") as err:
        small_server.client.completions.create(model="bare", prompt="w1 w2")
    assert err.value.body["param"] == "prompt"
    with pytest.raises(openai.BadRequestError, match="no tokenizer"):
        small_server.client.chat.completions.create(model="bare", messages=[{"role": "user", "content": "w1"}])


def test_full_queue_is_a_429_at_once(small_server):
    client = small_server.client
    running = []
    for i in range(2):  # both EP ranks run one sequence each, past its first token
        running.append(client.completions.create(model="bare", prompt=[i + 1] * 8, max_tokens=150,
                                                 temperature=0, stream=True))
        next(iter(running[-1]))
    waiting = client.completions.create(model="bare", prompt=[5] * 8, max_tokens=2, temperature=0, stream=True)
    t0 = time.monotonic()
    with pytest.raises(openai.RateLimitError):
        client.completions.create(model="bare", prompt=[6] * 8, max_tokens=2, temperature=0)
    assert time.monotonic() - t0 < 30
    assert small_server.metric("expertmesh_requests_total", outcome="queue_full") == 1
    aborted = small_server.metric("expertmesh_requests_total", outcome="abort")
    for stream in (*running, waiting):
        stream.close()
    deadline = time.monotonic() + 30  # the server has seen all three go (no longer waiting)
    while small_server.metric("expertmesh_requests_total", outcome="abort") < aborted + 3:
        assert time.monotonic() < deadline
        time.sleep(0.1)


def test_killed_rank_ends_requests_with_an_error_and_the_server_exits_nonzero(small_server):
    """Stops the second server (a later test gets a new one). The client's error event names no
    internal path or port (gloo's message has both)."""
    with httpx.stream("POST", small_server.url + "/v1/completions", timeout=60,
                      json={"model": "bare", "prompt": [4] * 8, "max_tokens": 200, "temperature": 0,
                            "stream": True}) as r:
        events = (line[len("data: "):] for line in r.iter_lines() if line.startswith("data: "))
        next(events)
        os.kill(small_server.ranks()[1], signal.SIGKILL)
        rest = list(events)
    assert rest[-1] == "[DONE]"
    error = json.loads(rest[-2])["error"]
    assert error["type"] == "server_error" and "the request was ended" in error["message"]
    assert not re.search(r"/\w|\.(py|cpp)|:\d{2,}", error["message"]), error["message"]
    try:  # rank 0 says so until the launcher, seeing rank 1 dead, stops it too
        assert small_server.get("/health").status_code == 503
    except httpx.ConnectError:
        pass
    assert small_server.proc.wait(60) == 1
    assert re.search(r"error: rank 1 failed: process died from signal SIGKILL", small_server.output())
    assert small_server.leftovers.alive() == []


@pytest.mark.parametrize("argv, message", [
    (["--deployment", "ep3"], "ep"),
    (["--kv-cache-gb", "0.000001"], "--kv-cache-gb"),
    (["--max-seqs", "0"], "max-seqs"),
    (["--max-waiting", "-1"], "--max-waiting"),
    (["--timeout", "0"], "--timeout"),
    (["--grace", "-1"], "--grace"),
    (["--a2a-chunks", "x", "--deployment", "ep2"], "--a2a-chunks"),
    (["--api-server-count", "0"], "--api-server-count"),
    (["--api-key", " "], "--api-key"),
    (["--max-stops", "0"], "--max-stops"),
    (["--max-stop-chars", "-1"], "--max-stop-chars"),
    (["--max-body-mb", "0"], "--max-body-mb"),
    (["--max-connections", "0"], "--max-connections"),
    (["--header-timeout", "0"], "--header-timeout"),
    (["--body-timeout", "-1"], "--body-timeout"),
    (["--keep-alive-timeout", "inf"], "--keep-alive-timeout"),
    (["--dp-routing", "random"], "--dp-routing"),
])
def test_bad_serve_flags_are_one_line_errors_before_any_rank_starts(argv, message, cli_error):
    assert message in cli_error(["serve", "--port", "0", *argv])


@pytest.mark.parametrize("argv, graphs", [([], "auto"), (["--enforce-eager"], "off")])
def test_serve_takes_enforce_eager_as_run_does(argv, graphs):
    from expertmesh.cli import build_parser
    from expertmesh.server.cli import serve_plan

    spec, _ = serve_plan(build_parser().parse_args(["serve", "--port", "0", *argv]))
    assert spec.graphs == graphs  # what serve_rank hands its Engine


def test_a_server_off_loopback_without_an_api_key_is_warned_about():
    from expertmesh.server.cli import _loopback

    assert _loopback("127.0.0.1") and _loopback("localhost") and _loopback("::1")
    assert not _loopback("0.0.0.0") and not _loopback("::")


def test_an_address_in_use_is_an_error_before_any_rank_starts(cli_error):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        line = cli_error(["serve", "--port", str(taken.getsockname()[1])])
    assert "cannot listen on 127.0.0.1" in line and "--port" in line


def test_under_torchrun_rank_0_serves_and_sigterm_stops_every_rank(checkpoint, hf_model, tmp_path):
    leftovers = Leftovers()
    env = leftovers.env()
    port = free_port()
    with open(tmp_path / "torchrun.log", "w+") as log:
        agent = subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--standalone",
                                  "--nproc-per-node", "2", "-m", "expertmesh.cli", "serve", "--model",
                                  str(checkpoint), "--deployment", "ep2", "--port", str(port),
                                  "--num-blocks", "64"], env=env, stdout=log, stderr=subprocess.STDOUT)
        try:
            client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="none", max_retries=0)
            deadline = time.monotonic() + START_S
            while True:
                try:
                    client.models.list()
                    break
                except openai.APIConnectionError:
                    log.seek(0)
                    assert agent.poll() is None and time.monotonic() < deadline, log.read()
                    time.sleep(0.5)
            r = client.completions.create(model="tinyqwen", prompt=[3, 1, 4, 1, 5], max_tokens=6, temperature=0)
            assert r.choices[0].token_ids == expected(hf_model, [3, 1, 4, 1, 5], 6)
        finally:
            agent.send_signal(signal.SIGTERM)
            agent.wait(90)
    assert leftovers.alive() == []
