"""The requests a simulated serving run feeds the engine's scheduler: Poisson arrivals of engine
`Request`s whose prompts share a prefix at a stated rate.

Prompt and output lengths are drawn uniformly in [L/2, 3L/2] (output at least 2 tokens). With a
prefix hit rate h, request i's prompt of P_i tokens starts with the first int(h P_i) tokens of one
sequence every request shares (a system prompt of varying length) and ends with tokens no other
request has. What the prefix cache then saves is the engine's own outcome (`engine/block_pool.py`):
whole blocks only, at most all but the last prompt token, only once an earlier request on the same
data-parallel rank has computed them and while they are not evicted, so the first requests, and
those that arrive while the first holder is still prefilling, find less than h of their prompt.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from expertmesh.engine.request import Request

_OWN = 1 << 32  # request i's own token ids start at (i + 1) * _OWN; shared ones are 0, 1, 2, ...


@dataclass(frozen=True)
class Arrival:
    """A request and when it reaches the engine (seconds from the stream's start)."""

    time_s: float
    request: Request


def poisson_stream(rate: float, prompt_len: int, output_len: int, requests: int, seed: int = 0,
                   prefix_hit_rate: float = 0.0) -> list[Arrival]:
    """`requests` arrivals at `rate` requests/s; the same seed draws the same times and lengths at
    any rate and hit rate. Each request asks for exactly its output length (`ignore_eos`)."""
    if rate <= 0:
        raise ValueError(f"arrival rate {rate} must be > 0 requests/s")
    if not 0 <= prefix_hit_rate < 1:
        raise ValueError(f"--prefix-hit-rate {prefix_hit_rate} must be in [0, 1)")
    rng = random.Random(seed)
    t, out = 0.0, []
    for i in range(requests):
        t += rng.expovariate(rate)
        prompt = rng.randint(max(1, prompt_len // 2), prompt_len * 3 // 2)
        output = rng.randint(max(2, output_len // 2), max(2, output_len * 3 // 2))
        shared = int(prefix_hit_rate * prompt)
        own = (i + 1) * _OWN
        tokens = tuple(range(shared)) + tuple(range(own, own + prompt - shared))
        out.append(Arrival(t, Request(i, tokens, max_tokens=output, ignore_eos=True)))
    return out


def longest(prompt_len: int, output_len: int) -> int:
    """Tokens of the longest request `poisson_stream` may draw (both lengths at 3/2 of their mean)."""
    return prompt_len * 3 // 2 + max(2, output_len * 3 // 2)
