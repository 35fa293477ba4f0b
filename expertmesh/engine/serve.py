"""Driving an engine through a workload: requests arriving (at steps or at times), aborts, and
the transcript of what came out and when (the input of TTFT / TPOT percentiles).

`serve` is called on every rank: rank 0 submits and steps, the others follow until rank 0 stops
them. Timestamps are rank 0's `time.perf_counter()`, relative to the start of `serve`.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch.distributed as dist

from expertmesh.engine.engine import Engine
from expertmesh.engine.request import Request
from expertmesh.engine.scheduler import SchedulerStats


@dataclass
class Transcript:
    """What rank 0 saw. tokens / logits / logprobs / token_times per request id, in output order
    (logprobs: `TokenOutput.logprobs`, for requests that ask);
    finished[id] = "stop" | "length" (absent: aborted or unfinished); rejected[id] = the error;
    rank_stats: every rank's scheduler stats after the last step."""

    tokens: dict = field(default_factory=dict)
    logits: dict = field(default_factory=dict)
    logprobs: dict = field(default_factory=dict)
    finished: dict = field(default_factory=dict)
    rejected: dict = field(default_factory=dict)
    submitted: dict = field(default_factory=dict)
    token_times: dict = field(default_factory=dict)
    steps: int = 0
    elapsed: float = 0.0
    rank_stats: list = field(default_factory=list)


def serve(engine: Engine, arrivals: list[tuple[float, Request]], aborts: list[tuple[float, object]] = (),
          clock: str = "step", on_step=None) -> Transcript | None:
    """Submit `arrivals[i] = (at, request)` and `aborts[i] = (at, request id)` once `at` is
    reached (`clock`: "step" counts engine steps, "time" seconds since the start), stepping
    until everything has arrived and finished. Rank 0 returns the transcript."""
    if engine.rank != 0:
        engine.follow()
        _rank_stats(engine)
        return None
    events = sorted([(at, 0, i, r) for i, (at, r) in enumerate(arrivals)] +
                    [(at, 1, i, rid) for i, (at, rid) in enumerate(aborts)], key=lambda e: e[:3])
    out = Transcript()
    start = time.perf_counter()
    while True:
        now = out.steps if clock == "step" else time.perf_counter() - start
        while events and events[0][0] <= now:
            _, kind, _, item = events.pop(0)
            if kind == 1:
                engine.abort(item)
                continue
            try:
                engine.add_request(item)
            except ValueError as exc:
                out.rejected[item.id] = str(exc)
                continue
            out.submitted[item.id] = time.perf_counter() - start
            out.tokens[item.id], out.token_times[item.id], out.logits[item.id] = [], [], []
            out.logprobs[item.id] = []
        if not engine.has_work:
            if not events:
                break
            if clock == "time":  # idle until the next arrival
                time.sleep(max(0.0, events[0][0] - (time.perf_counter() - start)))
                continue
        outputs = engine.step()
        t = time.perf_counter() - start
        for o in outputs:
            out.tokens[o.request_id].append(o.token)
            out.token_times[o.request_id].append(t)
            if o.logits is not None:
                out.logits[o.request_id].append(o.logits)
            if o.logprobs is not None:
                out.logprobs[o.request_id].append(o.logprobs)
            if o.finished:
                out.finished[o.request_id] = o.finished
        out.steps += 1
        if on_step is not None:
            on_step(out)
    out.elapsed = time.perf_counter() - start
    engine.shutdown()
    out.rank_stats = _rank_stats(engine)
    return out


def _rank_stats(engine: Engine) -> list[SchedulerStats]:
    mine = engine.scheduler.stats()
    if not dist.is_initialized():
        return [mine]
    everyone = [None] * dist.get_world_size()
    dist.all_gather_object(everyone, mine, group=engine.group)
    return everyone
