"""An API server process of `expertmesh serve` (`python -m expertmesh.server.frontend`, started
by the engine's rank 0 with its options in `EXPERTMESH_FRONTEND`): uvicorn serving the FastAPI
app (`server/app.py`) on the listening socket rank 0 bound and passed down, and the engine
reached through `server/ipc.py`.

`EngineClient` is the engine as the handlers see it: `submit` and `abort` gather into one
`ToEngine` per turn of the event loop; a task reads each step's `FromEngine` and hands every
token to its request's asyncio queue. Several front ends share the socket (each accepts
connections) and one Prometheus multiprocess directory, so any of them answers `/metrics` for
all; front end 0 alone records the engine's gauges and counters.

The front end ends: on SIGTERM (from rank 0: uvicorn stops accepting and gives open requests
`grace_s`; then those still open end with a 503, or a stream's error event), exit 0; when the engine reports a failure, or rank 0, its parent, is gone: every
open request ends with an error, `/health` and new requests get 503, and it exits 1.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import sys
import time
from dataclasses import dataclass

import uvicorn

from expertmesh.engine.scheduler import EngineConfig, Scheduler
from expertmesh.server.app import SHUTDOWN_MARGIN_S, Api, Limits, create_app
from expertmesh.server.connections import ConnectionLimits, quiet_accept_errors, uvicorn_options
from expertmesh.server.generation import EngineStopped
from expertmesh.server.ipc import FrontendChannel, NewRequest, ToEngine, options
from expertmesh.server.metrics import ServerMetrics

FRONTEND_ENV = "EXPERTMESH_FRONTEND"
PARENT_POLL_S = 0.25  # how often a front end checks that rank 0 is still its parent
DRAIN_S = 1.0  # what open requests get to receive their error once the engine is gone


@dataclass(frozen=True)
class FrontendOptions:
    """index: this front end (0 .. count-1). socket_path: the engine's IPC socket. fd: the
    listening socket. vocab_size, max_len, engine, num_blocks: what a request is checked
    against here (`engine`: the `EngineConfig`'s fields). n_experts: for the load metrics.
    The rest: `ServeOptions`'."""

    index: int
    socket_path: str
    fd: int
    name: str
    tokenizer: str | None
    vocab_size: int
    max_len: int
    engine: dict
    num_blocks: int
    max_waiting: int
    grace_s: float
    timeout_s: float
    limits: dict  # `app.Limits`' fields
    connections: dict  # `connections.ConnectionLimits`' fields, this process's share


class EngineClient:
    """The engine, from the handlers' event loop (see the module's docstring). `failure`: why the
    engine is gone, once it is."""

    def __init__(self, channel: FrontendChannel, metrics: ServerMetrics):
        self.channel, self.metrics = channel, metrics
        self.pending = ToEngine()
        self.flush_scheduled = False
        self.queues: dict[str, asyncio.Queue] = {}
        self.failure: str | None = None
        self.last_heard = time.monotonic()
        self.ranks = None  # an elastic engine's `ipc.RankState`s, the latest it sent
        self.degraded = False  # ... whether it runs fewer ranks than it started with
        self.join = None  # ... and the ticket a joining process reads (`elastic/join.py`)

    def submit(self, request, queue: asyncio.Queue) -> None:
        """Send `request` (an `engine.request.Request`, checked) with the next flush; its tokens
        (`ipc.Token`), or an exception, go to `queue`."""
        if self.failure is not None:
            queue.put_nowait(EngineStopped(self.failure))
            return
        self.queues[request.id] = queue
        self.pending.new.append(NewRequest(request.id, list(request.prompt), request.max_tokens,
                                           list(request.stop), request.temperature, request.top_p,
                                           request.seed, options(request)))
        self._schedule()

    def abort(self, request_id: str) -> None:
        if self.queues.pop(request_id, None) is not None and self.failure is None:
            self.pending.aborts.append(request_id)
            self._schedule()

    def started(self) -> None:
        self.pending.started = True
        self._schedule()

    def _schedule(self) -> None:
        if not self.flush_scheduled:
            self.flush_scheduled = True
            asyncio.get_running_loop().call_soon(self._flush)

    def _flush(self) -> None:
        message, self.pending, self.flush_scheduled = self.pending, ToEngine(), False
        self.channel.send(message)

    def fail(self, reason: str) -> None:
        if self.failure is None:
            self.failure = reason
        self.end_all(reason)

    def end_all(self, reason: str) -> None:
        """End every open request with `EngineStopped(reason)` (and abort it in the engine)."""
        for queue in self.queues.values():
            queue.put_nowait(EngineStopped(reason))
        if self.failure is None and self.queues:
            self.pending.aborts.extend(self.queues)
            self._schedule()
        self.queues.clear()

    async def receive(self) -> None:
        """Hand out every step's tokens until the engine reports a failure."""
        while self.failure is None:
            message = await self.channel.receive()
            self.last_heard = time.monotonic()
            for token in message.tokens:
                queue = self.queues.get(token.request_id)
                if queue is not None:
                    queue.put_nowait(token)
                    if token.finished:
                        del self.queues[token.request_id]
            for request_id, error in message.rejected.items():
                queue = self.queues.pop(request_id, None)
                if queue is not None:
                    queue.put_nowait(ValueError(error))
            if message.ranks is not None:
                self.ranks, self.degraded, self.join = message.ranks, message.degraded, message.join
            if message.stats:
                self.metrics.step(message.stats, message.counters, message.dp_ranks)
            if message.lost:
                self.metrics.recovered(message.lost, message.recovery_s, message.hung)
            if message.failure is not None:
                self.fail(message.failure)


def main() -> int:
    options = FrontendOptions(**json.loads(os.environ[FRONTEND_ENV]))
    # uvicorn re-raises the signal that stopped it once it is done: a no-op then, so exit 0.
    for s in (signal.SIGTERM, signal.SIGINT):
        signal.signal(s, lambda *_: None)
    return asyncio.run(_serve(options))


async def _serve(options: FrontendOptions) -> int:
    parent = os.getppid()
    metrics = ServerMetrics(engine_metrics=options.index == 0)
    channel = FrontendChannel(options.socket_path, options.index)
    engine = EngineClient(channel, metrics)
    api = Api(options.name, options.vocab_size, options.max_len, engine,
              Scheduler(EngineConfig(**options.engine), options.num_blocks), metrics,
              _tokenizer(options.tokenizer), options.max_waiting, options.timeout_s, options.grace_s,
              os.environ.get("EXPERTMESH_API_KEY") or None, Limits(**options.limits))
    quiet_accept_errors(asyncio.get_running_loop())
    config = uvicorn.Config(create_app(api), log_level="warning", lifespan="off",
                            timeout_graceful_shutdown=options.grace_s + SHUTDOWN_MARGIN_S,
                            **uvicorn_options(ConnectionLimits(**options.connections)))
    server = api.server = uvicorn.Server(config)
    listener = socket.socket(fileno=options.fd)
    serving = asyncio.create_task(server.serve(sockets=[listener]))
    receiving = asyncio.create_task(engine.receive())
    while not server.started and not serving.done():
        await asyncio.sleep(0.05)
    if server.started:
        engine.started()
    stopping_since = None
    while not serving.done():
        await asyncio.wait([serving], timeout=PARENT_POLL_S)
        if server.should_exit and stopping_since is None:
            stopping_since = time.monotonic()
        if stopping_since is not None and time.monotonic() - stopping_since >= options.grace_s:
            # Before uvicorn's own cut: 503s and error events, not 500s and broken streams.
            engine.end_all(f"the server shut down before it finished (--grace {options.grace_s:g} s)")
        if os.getppid() != parent:
            engine.fail("the engine process ended")
        elif receiving.done() and engine.failure is None:  # a message it could not read: a bug
            engine.fail("the channel to the engine broke")
        if engine.failure is not None and not server.should_exit:
            await asyncio.sleep(DRAIN_S)  # open requests send their error; then nothing waits
            server.should_exit = server.force_exit = True
    await serving
    receiving.cancel()
    channel.close()
    return 1 if engine.failure is not None or not server.started else 0


def _tokenizer(path: str | None):
    if path is None:
        return None
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(path)


if __name__ == "__main__":
    sys.exit(main())
