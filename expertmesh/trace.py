"""Spans of a run as a Chrome / Perfetto trace (trace-event JSON, open in ui.perfetto.dev).

One process runs one rank, so the tracer is per process: `start_tracing()` turns it on, code marks
work with `with span("expert compute"):`, and `take_spans()` hands the finished spans back. With
tracing off `span` returns a shared no-op context, so instrumented code costs one global lookup.

Spans are complete events ("ph": "X"): name, start and duration in microseconds, on the track
(`tid`) of their rank; spans of one rank never overlap (they are nested or sequential), while an
asynchronous exchange shows as a span on a second track of the rank ("rank R comm").

On a GPU a host clock would time how long the host took to enqueue a span's kernels, not their
work, so there `span` records a CUDA event pair on the current stream (`DeviceClock`): a span's
duration is device time, its start the device's, placed on the host timeline by one event recorded
when tracing started. The exchanges' spans (`record`) stay host observations: when the host saw
an exchange start and finish.
"""

from __future__ import annotations

import contextlib
import json
import time
from pathlib import Path

import torch

_spans: list[tuple[str, int, int, int]] | None = None  # (name, start ns, duration ns, lane)
_clock = None  # a DeviceClock while tracing a GPU rank, else None (host clock)
_lane_end: dict[int, int] = {}  # end of the last span recorded on each asynchronous lane
_NOOP = contextlib.nullcontext()
COMPUTE, COMM = 0, 1  # lanes of a rank: its main thread, and exchanges in flight


class DeviceClock:
    """Marks on a GPU stream: `mark()` records a timing event; `spans` turns (name, start mark,
    end mark, lane) into (name, start ns, duration ns, lane) once the device has passed them."""

    def __init__(self, device: torch.device, event=None, synchronize=None):
        self.event = event or (lambda: torch.cuda.Event(enable_timing=True))
        self.synchronize = synchronize or (lambda: torch.cuda.synchronize(device))
        self.base, self.base_ns = self.mark(), time.perf_counter_ns()

    def mark(self):
        e = self.event()
        e.record()
        return e

    def spans(self, marked: list) -> list[tuple[str, int, int, int]]:
        self.synchronize()
        return [(name, self.base_ns + int(self.base.elapsed_time(a) * 1e6),
                 int(a.elapsed_time(b) * 1e6), lane) for name, a, b, lane in marked]


def start_tracing(device: torch.device | None = None) -> None:
    """Trace from now on; on a CUDA `device`, spans in device time (`DeviceClock`)."""
    global _spans, _clock
    _spans = []
    _lane_end.clear()
    _clock = DeviceClock(device) if device is not None and device.type == "cuda" else None


def take_spans() -> list[tuple[str, int, int, int]]:
    """The spans recorded since `start_tracing`; tracing is off afterwards."""
    global _spans, _clock
    spans, _spans = _spans or [], None
    if _clock is not None:
        host = [s for s in spans if not hasattr(s[1], "elapsed_time")]
        spans = sorted(host + _clock.spans([s for s in spans if hasattr(s[1], "elapsed_time")]),
                       key=lambda s: s[1])
    _clock = None
    return spans


class _Span:
    __slots__ = ("name", "lane", "t0")

    def __init__(self, name: str, lane: int):
        self.name, self.lane = name, lane

    def __enter__(self):
        self.t0 = _clock.mark() if _clock is not None else time.perf_counter_ns()

    def __exit__(self, *exc):
        if _spans is None:
            return
        if _clock is not None:
            _spans.append((self.name, self.t0, _clock.mark(), self.lane))
        else:
            _spans.append((self.name, self.t0, time.perf_counter_ns() - self.t0, self.lane))


def span(name: str, lane: int = COMPUTE):
    """A context manager that records `name` while tracing, and does nothing otherwise."""
    return _Span(name, lane) if _spans is not None else _NOOP


def record(name: str, start_ns: int, end_ns: int, lane: int = COMM) -> None:
    """Record a span whose start and end were observed separately (an async exchange).

    Exchanges of one group run one after another, so a span starts no earlier than the end of
    the lane's previous one: the lane shows when each exchange could actually progress.
    """
    if _spans is not None:
        start_ns = max(start_ns, _lane_end.get(lane, start_ns))
        end_ns = max(start_ns, end_ns)
        _lane_end[lane] = end_ns
        _spans.append((name, start_ns, end_ns - start_ns, lane))


def trace_events(spans_by_rank: dict[int, list[tuple[str, int, int, int]]]) -> dict:
    """Spans of every rank -> a trace-event document; times relative to the earliest span."""
    t0 = min((s[1] for spans in spans_by_rank.values() for s in spans), default=0)
    events = []
    for rank, spans in sorted(spans_by_rank.items()):
        for lane, label in ((COMPUTE, f"rank {rank}"), (COMM, f"rank {rank} comm")):
            events.append({"name": "thread_name", "ph": "M", "pid": 0, "tid": 2 * rank + lane,
                           "args": {"name": label}})
        for name, start, dur, lane in spans:
            events.append({"name": name, "ph": "X", "pid": 0, "tid": 2 * rank + lane,
                           "ts": (start - t0) / 1e3, "dur": dur / 1e3})
    return {"traceEvents": events, "displayTimeUnit": "ms"}


def write_trace(path: str | Path, spans_by_rank: dict[int, list[tuple[str, int, int, int]]]) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(trace_events(spans_by_rank)))
    return path
