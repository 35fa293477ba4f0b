"""What the elastic tests (`test_elastic*.py`) share: streams of greedy completions read by
threads, the tiny preset's reference tokens, and the server's `/health` as they read it."""

from __future__ import annotations

import threading
import time
from typing import TYPE_CHECKING

import pytest

from expertmesh.config import preset
from expertmesh.model.transformer import reference_model
from serving import naive_tokens

if TYPE_CHECKING:
    from test_server import Server

STREAM_S = 300  # a stream's whole life on a loaded 2-core machine


@pytest.fixture(scope="module")
def reference():
    """The tiny preset's greedy tokens: its single-device model (seed 0, the server's weights)."""
    model = reference_model(preset("tiny"))
    return lambda prompt, n: naive_tokens(model, tuple(prompt), n)


class Streams:
    """Streamed greedy completions, one thread each: their token ids and arrival times."""

    def __init__(self, server: Server, prompts: list[list[int]], max_tokens: int):
        self.server, self.prompts, self.max_tokens = server, prompts, max_tokens
        self.tokens = [[] for _ in prompts]
        self.times = [[] for _ in prompts]
        self.reasons = [None] * len(prompts)
        self.errors = []
        self.threads = [threading.Thread(target=self._run, args=(server, i)) for i in range(len(prompts))]
        for t in self.threads:
            t.start()

    def _run(self, server: Server, i: int) -> None:
        try:
            stream = server.client.completions.create(model="tiny", prompt=self.prompts[i],
                                                      max_tokens=self.max_tokens, temperature=0,
                                                      stream=True)
            for chunk in stream:
                choice = chunk.choices[0]
                self.tokens[i] += choice.token_ids or []
                self.times[i] += [time.monotonic()] * len(choice.token_ids or [])
                self.reasons[i] = choice.finish_reason or self.reasons[i]
        except Exception as exc:  # the test reads it
            self.errors.append(exc)

    def wait_for_first(self, i: int) -> None:
        """Until stream `i` has its first token (polled finely: a kill right after it lands in
        the other streams' prefills)."""
        deadline = time.monotonic() + STREAM_S
        while not self.tokens[i]:
            assert time.monotonic() < deadline and not self.errors, self.errors
            time.sleep(0.002)

    def wait_for(self, tokens: int) -> None:
        """Until every stream has at least `tokens` tokens."""
        deadline = time.monotonic() + STREAM_S
        while min(len(t) for t in self.tokens) < tokens:
            assert not self.errors, self.errors
            assert time.monotonic() < deadline, [len(t) for t in self.tokens]
            time.sleep(0.01)

    def check(self, reference) -> None:
        """Every stream ended by length with the tokens `reference(prompt, n)`."""
        for t in self.threads:
            t.join(STREAM_S)
        log = self.server.output()[-4000:]
        assert not self.errors, (self.errors, log)
        for prompt, tokens, reason in zip(self.prompts, self.tokens, self.reasons):
            expected = reference(prompt, self.max_tokens)
            assert tokens == expected, (f"prompt {prompt}: got {tokens}, expected {expected}", log)
            assert reason == "length", log


def health(server: Server) -> dict:
    return server.get("/health").json()


def pid_of(server: Server, rank: int) -> int:
    return health(server)["ranks"][rank]["pid"]


def prompts(n: int, length: int, salt: int) -> list[list[int]]:
    """Token ids within both models' vocabularies (128 and 1024)."""
    return [[(salt + 7 * i + 3 * j) % 120 + 1 for j in range(length)] for i in range(n)]



def wait_health(server: Server, degraded: bool) -> dict:
    deadline = time.monotonic() + STREAM_S
    while (body := health(server)).get("degraded") is not degraded:
        assert time.monotonic() < deadline, body
        time.sleep(0.05)
    return body
