"""A generation request, and the tokens the engine hands back for it.

A `Request` checks its own values on construction; `check_for` checks it against the model
(vocabulary, maximum length); whether it fits the KV pool is the scheduler's `check`. Each raises
a one-line `ValueError` naming the field and the fix, and the engine rejects that request alone.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

MAX_PENALTY = 2.0  # presence / frequency penalties: the OpenAI API's range
MAX_BIAS = 100.0  # a logit_bias value, as OpenAI's
MAX_LOGIT_BIAS = 300  # entries of logit_bias (vLLM's default bound)
MAX_LOGPROBS = 20  # most likely tokens returned with each token (OpenAI's bound)


class RequestError(ValueError):
    """A request the engine cannot take. `field`: the `Request` field at fault (an HTTP error's
    `param`); `reason`: what is wrong and the fix; the message names the request too."""

    def __init__(self, request_id, field: str, reason: str):
        super().__init__(f"request {request_id!r}: {reason}")
        self.field, self.reason = field, reason


@dataclass(frozen=True)
class Request:
    """`prompt`: token ids (1 .. max length); generation stops after `max_tokens` tokens, or at a
    token in `stop` or in the engine's EOS ids (that token is returned, then the request ends).
    temperature 0 is greedy; otherwise temperature / top-k / top-p sampling seeded by `seed`
    (any integer; `engine/sampling.py`); top_k 0 keeps every token.

    The logits are processed first (`engine/logits_processing.py`, vLLM's semantics):
    `logit_bias` ((token id, bias) pairs, bias in [-100, 100]) is added; before `min_tokens`
    tokens are generated, the stop ids and (unless `ignore_eos`) the EOS ids cannot be drawn;
    `repetition_penalty` (> 0, 1 is none) divides a positive logit and multiplies a negative one
    of every token in the prompt or the output; `frequency_penalty` times a token's count in the
    output and `presence_penalty` once if it is there are subtracted (each in [-2, 2]).
    `ignore_eos`: an EOS id does not end the request. `logprobs`: None, or the number (0 .. 20)
    of most likely tokens whose log-probabilities come back with each token, beside the drawn
    token's own (`engine/logprobs.py`).

    `generated`: tokens of its output already produced and streamed (a request re-queued by
    elastic recovery): they are recomputed with the prompt, not output again, and count towards
    `max_tokens`."""

    id: int | str
    prompt: tuple[int, ...]
    max_tokens: int = 16
    stop: tuple[int, ...] = ()
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int = 0
    top_k: int = 0
    generated: tuple[int, ...] = ()
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    logit_bias: tuple[tuple[int, float], ...] = ()
    min_tokens: int = 0
    ignore_eos: bool = False
    logprobs: int | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "prompt", tuple(int(t) for t in self.prompt))
        object.__setattr__(self, "stop", tuple(int(t) for t in self.stop))
        object.__setattr__(self, "generated", tuple(int(t) for t in self.generated))
        if not self.prompt:
            raise RequestError(self.id, "prompt", "the prompt is empty; give at least one token id")
        if not isinstance(self.max_tokens, int) or self.max_tokens < 1:
            raise RequestError(self.id, "max_tokens", f"max_tokens={self.max_tokens!r} must be a positive integer")
        if not 0 <= self.temperature < float("inf"):
            raise RequestError(self.id, "temperature",
                               f"temperature={self.temperature} must be finite and >= 0 (0 is greedy)")
        if not isinstance(self.top_k, int) or self.top_k < 0:
            raise RequestError(self.id, "top_k", f"top_k={self.top_k!r} must be an integer >= 0 (0 keeps every token)")
        if not 0 < self.top_p <= 1:
            raise RequestError(self.id, "top_p", f"top_p={self.top_p} must be in (0, 1]")
        object.__setattr__(self, "logit_bias", tuple((int(t), float(b)) for t, b in self.logit_bias))
        for field_ in ("presence_penalty", "frequency_penalty"):
            if not -MAX_PENALTY <= getattr(self, field_) <= MAX_PENALTY:
                raise RequestError(self.id, field_, f"{field_}={getattr(self, field_)} must be in [-2, 2]")
        if not 0 < self.repetition_penalty < float("inf"):
            raise RequestError(self.id, "repetition_penalty", f"repetition_penalty={self.repetition_penalty} "
                               f"must be finite and > 0 (1 is none)")
        if len(self.logit_bias) > MAX_LOGIT_BIAS:
            raise RequestError(self.id, "logit_bias",
                               f"logit_bias has {len(self.logit_bias)} entries; at most {MAX_LOGIT_BIAS}")
        if any(not -MAX_BIAS <= b <= MAX_BIAS for _, b in self.logit_bias):
            raise RequestError(self.id, "logit_bias", "a logit_bias value must be in [-100, 100]")
        if not isinstance(self.min_tokens, int) or not 0 <= self.min_tokens <= self.max_tokens:
            raise RequestError(self.id, "min_tokens", f"min_tokens={self.min_tokens!r} must be an integer in "
                               f"[0, max_tokens {self.max_tokens}]")
        if self.logprobs is not None and not (isinstance(self.logprobs, int) and 0 <= self.logprobs <= MAX_LOGPROBS):
            raise RequestError(self.id, "logprobs", f"logprobs={self.logprobs!r} must be an integer in [0, {MAX_LOGPROBS}]")

    def check_for(self, vocab_size: int, max_len: int) -> None:
        for field_, where, ids in (("prompt", "", self.prompt), ("stop", "", self.stop),
                                   ("logit_bias", "logit_bias ", tuple(t for t, _ in self.logit_bias))):
            bad = [t for t in ids if not 0 <= t < vocab_size]
            if bad:
                raise RequestError(self.id, field_, f"{where}token id {bad[0]} is outside the vocabulary "
                                                    f"[0, {vocab_size}); use ids below {vocab_size}")
        if len(self.prompt) + self.max_tokens > max_len:
            raise RequestError(self.id, "prompt", f"prompt length {len(self.prompt)} + max_tokens {self.max_tokens} "
                                                  f"exceeds the maximum length {max_len}; shorten the prompt or "
                                                  f"lower max_tokens")


@dataclass(slots=True)
class TokenOutput:
    """One generated token of a request: its `index` in the request's output, and `finished`
    ("stop": a stop or EOS token, "length": max_tokens reached; None while it goes on), and the
    logits `[V]` it was drawn from when the engine records them. `logprobs`, when the request
    asked: (the token's log-probability, ((token id, log-probability), ...) of the most likely
    tokens, most likely first), from the raw logits (`engine/logprobs.py`).

    Made once per sequence per step (`Scheduler.finish`): slots, not frozen, whose `__init__`
    sets each field through `object.__setattr__` (4x the cost: 1.1 against 0.25 us)."""

    request_id: int | str
    token: int
    index: int
    finished: str | None = None
    logits: torch.Tensor | None = field(default=None, compare=False, repr=False)
    cached: int | None = field(default=None, compare=False)
    logprobs: tuple | None = None
