"""A generation request, and the tokens the engine hands back for it.

A `Request` checks its own values on construction; `check_for` checks it against the model
(vocabulary, maximum length); whether it fits the KV pool is the scheduler's `check`. Each raises
a one-line `ValueError` naming the field and the fix, and the engine rejects that request alone.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass(frozen=True)
class Request:
    """`prompt`: token ids (1 .. max length); generation stops after `max_tokens` tokens, or at a
    token in `stop` or in the engine's EOS ids (that token is returned, then the request ends).
    temperature 0 is greedy; otherwise temperature / top-k / top-p sampling seeded by `seed`
    (any integer; `engine/sampling.py`); top_k 0 keeps every token. `generated`: tokens of its
    output already produced and streamed (a request re-queued by elastic recovery): they are
    recomputed with the prompt, not output again, and count towards `max_tokens`."""

    id: int | str
    prompt: tuple[int, ...]
    max_tokens: int = 16
    stop: tuple[int, ...] = ()
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int = 0
    top_k: int = 0
    generated: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        object.__setattr__(self, "prompt", tuple(int(t) for t in self.prompt))
        object.__setattr__(self, "stop", tuple(int(t) for t in self.stop))
        object.__setattr__(self, "generated", tuple(int(t) for t in self.generated))
        name = f"request {self.id!r}"
        if not self.prompt:
            raise ValueError(f"{name}: the prompt is empty; give at least one token id")
        if not isinstance(self.max_tokens, int) or self.max_tokens < 1:
            raise ValueError(f"{name}: max_tokens={self.max_tokens!r} must be a positive integer")
        if not 0 <= self.temperature < float("inf"):
            raise ValueError(f"{name}: temperature={self.temperature} must be finite and >= 0 (0 is greedy)")
        if not isinstance(self.top_k, int) or self.top_k < 0:
            raise ValueError(f"{name}: top_k={self.top_k!r} must be an integer >= 0 (0 keeps every token)")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"{name}: top_p={self.top_p} must be in (0, 1]")

    def check_for(self, vocab_size: int, max_len: int) -> None:
        name = f"request {self.id!r}"
        bad = [t for t in self.prompt + self.stop if not 0 <= t < vocab_size]
        if bad:
            raise ValueError(f"{name}: token id {bad[0]} is outside the vocabulary [0, {vocab_size}); "
                             f"use ids below {vocab_size}")
        if len(self.prompt) + self.max_tokens > max_len:
            raise ValueError(f"{name}: prompt length {len(self.prompt)} + max_tokens {self.max_tokens} "
                             f"exceeds the maximum length {max_len}; shorten the prompt or lower max_tokens")


@dataclass(frozen=True)
class TokenOutput:
    """One generated token of a request: its `index` in the request's output, and `finished`
    ("stop": a stop or EOS token, "length": max_tokens reached; None while it goes on), and the
    logits `[V]` it was drawn from when the engine records them."""

    request_id: int | str
    token: int
    index: int
    finished: str | None = None
    logits: torch.Tensor | None = field(default=None, compare=False, repr=False)
    cached: int | None = field(default=None, compare=False)
