"""The one channel between the API server processes (front ends) and the engine's rank 0:
ZeroMQ over an `ipc://` socket in a private directory, one msgpack message type each way.

  front end -> engine  `ToEngine`: the requests and aborts its handlers made during one turn of
                       its event loop (and `started` once, when its HTTP server accepts).
  engine -> front end  `FromEngine`, once per engine step to every front end: its requests' new
                       tokens and finish reasons, requests the engine rejected, the pool stats of
                       the step, the ranks' expert-parallel counters (to front end 0 only, so that
                       they are counted once), and the engine's failure when it failed.

Rank 0 binds a ROUTER socket, which knows each front end by its identity (`fe{index}`); a front
end connects a DEALER. Neither side ever waits on the other: the engine polls between steps and
sends without blocking, a front end sends and receives on its asyncio loop.
"""

from __future__ import annotations

from dataclasses import fields

import msgspec
import zmq
import zmq.asyncio

from expertmesh.engine.request import Request
from expertmesh.engine.scheduler import SchedulerStats


class NewRequest(msgspec.Struct, frozen=True):
    """A request checked by the front end (`engine/request.py`'s fields): token ids in; the
    sampling options (`options`: `Request`'s fields from presence_penalty on) only where given."""

    id: str
    prompt: list[int]
    max_tokens: int
    stop: list[int]
    temperature: float
    top_p: float
    seed: int
    options: dict[str, float | int | bool | list[list[float]] | None] = {}


class ToEngine(msgspec.Struct):
    new: list[NewRequest] = []
    aborts: list[str] = []
    started: bool = False


class Token(msgspec.Struct, array_like=True, frozen=True):
    """One generated token of a request; `finished` is "stop", "length" or None; `cached`, on
    its first token, the prompt tokens found in the prefix cache; `logprobs`:
    `engine/request.py: TokenOutput.logprobs` when the request asked (8 + 16 k bytes)."""

    request_id: str
    token: int
    finished: str | None = None
    cached: int | None = None
    logprobs: tuple[float, list[tuple[int, float]]] | None = None


class CounterTotals(msgspec.Struct, frozen=True):
    """Every rank's expert-parallel counters since the last collection, summed over ranks:
    bytes of token rows the exchange sent and of those to another node, assignments over capacity
    dropped / rerouted, the mean max / mean rank load of the MoE calls (None: no EP layer), and
    the assignments each expert computed, `expert_tokens[layer] = [n_experts]`."""

    exchanged_bytes: int
    cross_node_bytes: int
    dropped: int
    rerouted: int
    imbalance: float | None
    expert_tokens: dict[int, list[int]]
    # online EPLB (`parallel/eplb.py`): last window's imbalance per layer, windows that
    # rebalanced, seconds each step that did EPLB work spent on it
    eplb_imbalance: dict[int, float] = {}
    eplb_rebalances: int = 0
    eplb_stalls: list[float] = []


class RankState(msgspec.Struct, frozen=True):
    """One rank of an elastic server (`--elastic`): its original number, pid, "ok" or "dead"."""
    rank: int
    pid: int
    state: str


class FromEngine(msgspec.Struct):
    """`stats`: per data-parallel rank, the scheduler's `stats()` after the step. Elastic
    servers: every rank's state (`ranks`), and in the message after a recovery, to front end 0,
    the ranks `lost`, the `recovery_s` seconds it took and how many of them had `hung`, whether
    fewer ranks than the deployment's run (`degraded`), the file a joining process reads
    (`join`, `elastic/join.py`), and each data-parallel rank's label in `/metrics` (`dp_ranks`:
    a recovery renumbers them; `elastic/slots.py: relabel`)."""

    tokens: list[Token] = []
    rejected: dict[str, str] = {}
    stats: list[SchedulerStats] = []
    counters: CounterTotals | None = None
    failure: str | None = None
    ranks: list[RankState] | None = None
    lost: int = 0
    recovery_s: float = 0.0
    hung: int = 0
    degraded: bool = False
    join: str | None = None
    dp_ranks: list[int] | None = None


OPTIONS = ("presence_penalty", "frequency_penalty", "repetition_penalty", "logit_bias", "min_tokens",
           "ignore_eos", "logprobs")


def options(request: Request) -> dict:
    """`NewRequest.options` of `request`: its sampling options away from their defaults."""
    defaults = {f.name: f.default for f in fields(Request)}
    return {name: getattr(request, name) for name in OPTIONS if getattr(request, name) != defaults[name]}


def identity(index: int) -> bytes:
    return f"fe{index}".encode()


class EngineChannel:
    """Rank 0's end (synchronous, used between engine steps)."""

    def __init__(self, path: str):
        self.context = zmq.Context()
        self.socket = self.context.socket(zmq.ROUTER)
        self.socket.setsockopt(zmq.LINGER, 0)
        self.socket.setsockopt(zmq.SNDHWM, 0)  # a ROUTER drops at its high-water mark: never
        self.socket.bind(f"ipc://{path}")
        self.poller = zmq.Poller()
        self.poller.register(self.socket, zmq.POLLIN)
        self.encoder = msgspec.msgpack.Encoder()
        self.decoder = msgspec.msgpack.Decoder(ToEngine)

    def receive(self, timeout_s: float) -> list[tuple[int, ToEngine]]:
        """Every message waiting, as (front end index, message); waits up to `timeout_s` for the
        first one when none is."""
        out = []
        if not self.poller.poll(timeout_s * 1000):
            return out
        while True:
            try:
                sender, payload = self.socket.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                return out
            out.append((int(sender[2:]), self.decoder.decode(payload)))

    def send(self, index: int, message: FromEngine) -> None:
        """To one front end; dropped if it is not connected (the ROUTER's rule)."""
        self.socket.send_multipart([identity(index), self.encoder.encode(message)], zmq.NOBLOCK)

    def close(self) -> None:
        self.socket.close()
        self.context.term()


class FrontendChannel:
    """A front end's end (asyncio)."""

    def __init__(self, path: str, index: int):
        self.context = zmq.asyncio.Context()
        self.socket = self.context.socket(zmq.DEALER)
        self.socket.setsockopt(zmq.IDENTITY, identity(index))
        self.socket.setsockopt(zmq.LINGER, 0)
        self.socket.setsockopt(zmq.SNDHWM, 0)
        self.socket.connect(f"ipc://{path}")
        self.encoder = msgspec.msgpack.Encoder()
        self.decoder = msgspec.msgpack.Decoder(FromEngine)

    def send(self, message: ToEngine):
        """Queue a message; returns the send's future."""
        return self.socket.send(self.encoder.encode(message))

    async def receive(self) -> FromEngine:
        return self.decoder.decode(await self.socket.recv())

    def close(self) -> None:
        self.socket.close()
        self.context.term()
