"""What every layer of one forward shares, set once by whoever runs the forward (the engine's
runner, a test) instead of threaded through every layer's signature, as vLLM's forward context
and nano-vllm's `utils/context.py` do.

Today that is the EP exchange's token bound: `low_latency_tokens`, a bound on every EP rank's
tokens in this forward (the same on every rank of the group, agreed by `parallel/expert.py:
ExchangeChoice`) under which each MoE layer's exchange takes its low-latency path
(`parallel/low_latency.py`); None: the standard one. Two micro-batches of one forward that take
turns (two-batch overlap) share it: their generators run inside the caller's `with`.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass


@dataclass(frozen=True)
class ForwardContext:
    low_latency_tokens: int | None = None


_CURRENT: ContextVar[ForwardContext] = ContextVar("forward_context", default=ForwardContext())


@contextmanager
def forward_context(low_latency_tokens: int | None = None) -> Iterator[ForwardContext]:
    """The context of the forward run inside this block; outside every block: the default."""
    context = ForwardContext(low_latency_tokens)
    token = _CURRENT.set(context)
    try:
        yield context
    finally:
        _CURRENT.reset(token)


def current_forward() -> ForwardContext:
    return _CURRENT.get()
