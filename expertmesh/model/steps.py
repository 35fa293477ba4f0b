"""Forward passes as generators, so that two micro-batches can take turns (two-batch overlap).

A *steps* generator runs one forward and yields each time it has started an exchange whose result
it needs next (a collective in flight): whoever drives it may run other work before resuming it,
which then waits for the exchange. Its return value is the forward's output. Code without an
exchange is a generator that never yields.

`run_steps` drives one generator to its end (an ordinary forward). `take_turns` drives several,
resuming each in turn until it yields again: with two micro-batches A and B, A's token exchange
is in flight while B's attention, routing or expert compute runs, and the other way round.
Every rank drives the same generators in the same order, and a generator's yields do not depend
on this rank's data, so every rank issues the same collectives in the same order.
"""

from __future__ import annotations

from collections.abc import Generator
from typing import Any, TypeVar

T = TypeVar("T")
Steps = Generator[None, None, T]


def run_steps(steps: Steps[T]) -> T:
    """Drive `steps` to its end without interleaving; its return value."""
    while True:
        try:
            next(steps)
        except StopIteration as done:
            return done.value


def take_turns(all_steps: list[Steps[Any]]) -> list[Any]:
    """Drive every generator, resuming them in list order, each until its next yield, until all
    have ended; their return values, in list order."""
    results: list[Any] = [None] * len(all_steps)
    live = list(range(len(all_steps)))
    while live:
        for i in list(live):
            try:
                next(all_steps[i])
            except StopIteration as done:
                results[i] = done.value
                live.remove(i)
    return results
