"""Is a rank hung? Each rank's heartbeat, and the launcher's verdict on it (`serve --elastic`,
`--hang-timeout`).

A rank that dies is seen by its launcher at once: the process exits. A rank that hangs does not
exit (SIGSTOP, a loop that never ends, native code that never returns), and its peers wait for it
in their next collective until the group's timeout. So every rank of an elastic run writes
three numbers into memory it shares with the launcher (`Beats`: one row per rank, doubles, made
before the ranks fork):

    beat:     when its heartbeat thread last ran (every `BEAT_S`): the process is scheduled, not
              stopped, and the GIL is free;
    progress: when its step loop last made progress (`Heartbeat.arm` as a step or a recovery
              ends, `Heartbeat.mark` as a layer's forward ends); 0 while the rank is not watched;
    busy:     CPU seconds the rank's main thread spent since that progress (its thread CPU
              clock, read by the heartbeat thread).

The launcher polls every row and asks `verdict`. A watched rank is hung when
  - it has not beaten for `hang_s` (stopped, or frozen in native code holding the GIL), or
  - it has not progressed for `hang_s` while its main thread computed for at least `BUSY_SHARE`
    of that time (a loop that never ends).
How a slow rank is told from a hung one: progress is counted per layer, so the bound is one
layer's forward of one step (at most `--max-batched-tokens` tokens), not a whole step, prefill or
request. Time spent waiting on peers does not count: a rank in a gloo collective sleeps in a
condition variable (one that waited 3 s in an all-to-all used 1 ms of main-thread CPU) while its
heartbeat thread beats, so the peers of a hung rank, all waiting for it, are never blamed. A
rank is watched from the end of its first step, and again from the end of a recovery: start-up
(weight loading, kernel timing, graph capture), the first step (where first calls set themselves
up) and a recovery (which may read experts from a checkpoint) are bounded by `--timeout` as
before. What this does not catch: a rank blocked outside any collective without computing (a
lock never released, a sleep) looks like one waiting on its peers; the step ends at `--timeout`.
"""

from __future__ import annotations

import math
import multiprocessing as mp
import threading
import time

BEAT_S = 0.1  # how often a rank's heartbeat thread beats
BUSY_SHARE = 0.05  # a rank whose main thread computed this share of a stale stretch is busy
DEFAULT_HANG_S = 4.0  # `--hang-timeout`'s default: a client's gap is this plus the recovery (under 5 s)
FIELDS = 3  # beat, progress, busy


def check_hang_timeout(hang_s: float, timeout: float) -> None:
    """ValueError (one line) unless `hang_s` is a positive number of seconds below `timeout`."""
    if not (math.isfinite(hang_s) and 0 < hang_s < timeout):
        raise ValueError(f"--hang-timeout {hang_s} must be a positive number of seconds below "
                         f"--timeout ({timeout:g})")


def was_hung(how: str) -> bool:
    """Whether a dead rank's ending (`launch.py`'s marker) was a hang's kill."""
    return how.startswith("hung for ")


def verdict(now: float, beat: float, progress: float, busy: float, hang_s: float) -> str | None:
    """Why a rank with these numbers is hung ("hung for 5.2 s (...)"), or None: alive, or not
    watched. Times are `time.monotonic()`, the same clock in every process of the machine."""
    if progress <= 0:
        return None
    if now - beat > hang_s:
        return f"hung for {now - beat:.1f} s (no heartbeat: stopped, or frozen holding the GIL)"
    stale = now - progress
    if stale > hang_s and busy >= BUSY_SHARE * stale:
        return f"hung for {stale:.1f} s (computing without progress: {busy:.1f} s of CPU)"
    return None


class Beats:
    """Every rank's row (beat, progress, busy), in memory shared with the forked ranks."""

    def __init__(self, world_size: int):
        self.values = mp.get_context("fork").RawArray("d", FIELDS * world_size)

    def row(self, rank: int) -> tuple[float, float, float]:
        return tuple(self.values[FIELDS * rank:FIELDS * (rank + 1)])

    def verdict(self, rank: int, hang_s: float) -> str | None:
        return verdict(time.monotonic(), *self.row(rank), hang_s)


class Heartbeat:
    """One rank's side: a thread that beats, and `mark` for its step loop. Built in the rank's
    main thread, whose CPU clock the thread reads."""

    def __init__(self, beats: Beats, rank: int):
        self.values, self.base = beats.values, FIELDS * rank
        self.armed = False
        self.clock = time.pthread_getcpuclockid(threading.get_ident())
        threading.Thread(target=self._beat, name="heartbeat", daemon=True).start()

    def arm(self) -> None:
        """A step (or a recovery) ended: watched from now on (until `pause`)."""
        self.armed = True
        self.mark()

    def mark(self, *_) -> None:
        """The step loop progressed, if watched (the arguments are `model.after_layer`'s, unused)."""
        if self.armed:
            self.values[self.base + 1] = time.monotonic()

    def pause(self) -> None:
        """Not watched until the next `arm` (a recovery: `--timeout` bounds it)."""
        self.armed = False
        self.values[self.base + 1] = 0.0

    def _beat(self) -> None:
        seen, cpu_then = None, 0.0
        while True:
            progress = self.values[self.base + 1]
            try:
                cpu = time.clock_gettime(self.clock)
            except OSError:  # the main thread has ended: so has the step loop
                return
            if progress != seen:
                seen, cpu_then = progress, cpu
            self.values[self.base + 2] = cpu - cpu_then
            self.values[self.base] = time.monotonic()
            time.sleep(BEAT_S)


_MINE: list[Heartbeat] = []  # this rank's, when its launcher watches it


def start(beats: Beats, rank: int) -> Heartbeat:
    """This rank's heartbeat (the launcher's `_child` calls it first thing)."""
    _MINE[:] = [Heartbeat(beats, rank)]
    return _MINE[0]


def mine() -> Heartbeat | None:
    """This rank's heartbeat, if its launcher watches it for hangs (else None)."""
    return _MINE[0] if _MINE else None
