"""The engine under a server: rank 0 steps it in a thread fed by a queue, the other ranks follow.

Rank 0's `EngineLoop` thread owns the `Engine`: HTTP handlers (on the asyncio thread) `submit`
requests and `abort` them through a thread-safe queue, and each request's tokens go back to its
`sink` (a callable the handler gave, which hands them to its asyncio queue). Before each step the
thread takes everything queued; with nothing to do it waits on the queue at most `idle_s` and then
steps anyway (an empty step), so the other ranks, blocked in the step's broadcast, always hear
from rank 0 well within the collectives' timeout, and a dead rank is noticed within `idle_s`.

Every `STATS_EVERY` steps, every rank sends rank 0 its expert-parallel counters since the last
time (`gather_object` over the engine's control group: rows per expert per MoE call, rows sent,
cross-node bytes, dropped and rerouted assignments), so that they never grow without bound.
"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Callable

import torch.distributed as dist

from expertmesh.engine import counters
from expertmesh.engine.counters import RankCounters
from expertmesh.engine.engine import Engine
from expertmesh.engine.request import Request, TokenOutput
from expertmesh.model.transformer import MoETransformer

STATS_EVERY = 16  # steps between two collections of the ranks' counters
IDLE_S = 0.5  # the longest rank 0 waits, idle, before an empty step


class EngineStopped(RuntimeError):
    """What a request's sink gets when the engine ends before the request does."""


def share_counters(engine: Engine, model: MoETransformer) -> list[RankCounters] | None:
    """Collective: every rank's counters since the last call, which resets them; rank 0 gets the
    list, the others None."""
    mine = counters.take(model, engine.rank)
    if not dist.is_initialized():
        return [mine]
    everyone = [None] * dist.get_world_size() if engine.rank == 0 else None
    dist.gather_object(mine, everyone, dst=0, group=engine.group)
    return everyone


def follow(engine: Engine, model: MoETransformer) -> None:
    """A rank other than 0: step with rank 0 until it says stop."""
    steps = 0
    while True:
        engine.step()
        if engine.stopped:
            return
        steps += 1
        if steps % STATS_EVERY == 0:
            share_counters(engine, model)


Sink = Callable[[TokenOutput | BaseException], None]


class EngineLoop:
    """Rank 0's engine, stepped by one thread (see the module's docstring).

    on_step(stats, counters): after each step, the data-parallel ranks' scheduler stats, and
    the ranks' counters when they were collected (else None). on_failure(exc): once, from the
    thread, when a step raised (a rank died, a timeout); every live sink got `exc` before.
    """

    def __init__(self, engine: Engine, model: MoETransformer, on_step=None, on_failure=None,
                 idle_s: float = IDLE_S):
        self.engine, self.model, self.idle_s = engine, model, idle_s
        self.on_step, self.on_failure = on_step, on_failure
        self.inbox: queue.SimpleQueue = queue.SimpleQueue()
        self.sinks: dict[object, Sink] = {}
        self.failure: BaseException | None = None
        self.step_started: float | None = None  # monotonic time of the step in progress
        self.stopping = False
        self.thread = threading.Thread(target=self._run, name="engine", daemon=True)

    def start(self) -> None:
        self.thread.start()

    def submit(self, request: Request, sink: Sink) -> None:
        """Queue a request (already checked against the model and the pool)."""
        self.inbox.put(("add", request, sink))

    def abort(self, request_id) -> None:
        self.inbox.put(("abort", request_id, None))

    def stop(self, timeout: float) -> None:
        """End every request still running (its sink gets `EngineStopped`), stop every rank."""
        self.inbox.put(("stop", None, None))
        self.thread.join(timeout)
        if self.thread.is_alive():
            raise TimeoutError(f"the engine did not stop within {timeout:.0f} s")

    def stuck_for(self) -> float:
        """Seconds the step in progress has taken so far (0 between steps)."""
        started = self.step_started
        return 0.0 if started is None else time.monotonic() - started

    def fail(self, exc: BaseException) -> None:
        """End every request with `exc` (from the thread, or when the watchdog gives up on it)."""
        if self.failure is None:
            self.failure = exc
        self._end_all(exc)

    def _end_all(self, exc: BaseException) -> None:
        for sink in list(self.sinks.values()):
            sink(exc)
        self.sinks.clear()

    def _take(self, block: bool) -> bool:
        """Apply what the handlers queued; False once asked to stop."""
        try:
            item = self.inbox.get(timeout=self.idle_s) if block else self.inbox.get_nowait()
        except queue.Empty:
            return True
        while True:
            kind, payload, sink = item
            if kind == "stop":
                return False
            if kind == "add":
                try:
                    self.engine.add_request(payload)
                    self.sinks[payload.id] = sink
                except ValueError as exc:  # checked by the handler already; never fatal
                    sink(exc)
            elif self.sinks.pop(payload, None) is not None:
                self.engine.abort(payload)
            try:
                item = self.inbox.get_nowait()
            except queue.Empty:
                return True

    def _run(self) -> None:
        steps = 0
        try:
            while self._take(block=not self.engine.has_work):
                self.step_started = time.monotonic()
                outputs = self.engine.step()
                self.step_started = None
                for out in outputs:
                    sink = self.sinks.get(out.request_id)
                    if sink is not None:
                        sink(out)
                        if out.finished:
                            del self.sinks[out.request_id]
                steps += 1
                counters = share_counters(self.engine, self.model) if steps % STATS_EVERY == 0 else None
                if self.on_step is not None:
                    self.on_step(self.engine.stats(), counters)
            self.stopping = True
            for request_id in list(self.sinks):
                self.engine.abort(request_id)
            self._end_all(EngineStopped("the server is shutting down"))
            self.engine.shutdown()
        except BaseException as exc:  # a dead rank, a broken collective: end every request with it
            self.step_started = None
            self.fail(exc)
            if self.on_failure is not None:
                self.on_failure(exc)
