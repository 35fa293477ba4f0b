"""Choosing the next token from logits: greedy, or temperature / top-p with seeded randomness.

A random draw never depends on what else is in the batch or on which rank samples: `sample`
(the static batch) draws from (seed, step, global sequence index), `start_draws` / `finish_draws` (the
serving engine) from (request seed, index of the token in the request's output).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from expertmesh.config import Workload
from expertmesh.model.paged import upload


def sample(logits: torch.Tensor, rows: torch.Tensor, step: int, workload: Workload) -> torch.Tensor:
    """logits `[b, V]` of the sequences with global indices `rows [b]` -> token ids `[b]` (int64)."""
    if workload.temperature == 0:
        return logits.argmax(dim=-1)
    gen = torch.Generator().manual_seed(workload.seed * 1_000_003 + step)
    u = torch.rand(workload.batch_size, generator=gen, dtype=torch.float64)[rows.cpu()]
    n = len(rows)
    tokens = _nucleus(logits, torch.full((n,), workload.temperature, dtype=torch.float64),
                      torch.full((n,), workload.top_p, dtype=torch.float64), u)
    return tokens.to(logits.device)


@dataclass
class Draws:
    """One batch of requests' sampling between its device part and its host part: `device`
    `[S + n * V]` holds the S greedy token ids (in the logits' float type: exact below 2^24, fp32's
    mantissa) and the logits of the n rows that draw at random (`drawn`), to be read in one copy,
    possibly with other values of the step (`engine/runner.py` reads a step's at once)."""

    device: torch.Tensor
    drawn: list[int]
    temperature: list[float]
    top_p: list[float]
    seeds: list[int]
    index: list[int]


def start_draws(logits: torch.Tensor, temperature: list[float], top_p: list[float],
                seeds: list[int], index: list[int]) -> Draws:
    """logits `[S, V]`, one row per request, with its sampling values and the index of the token
    being drawn in its output -> what to read for them (device work only: nothing is read)."""
    S, V = logits.shape
    greedy = logits.argmax(dim=-1)
    drawn = [i for i, t in enumerate(temperature) if t > 0]
    dtype = torch.float64 if V > 2**24 or logits.dtype == torch.float64 else torch.float32
    parts = [greedy.to(dtype)]
    if drawn:
        rows = logits if len(drawn) == S else logits[upload([torch.tensor(drawn)], logits.device)[0]]
        parts.append(rows.to(dtype).reshape(-1))
    return Draws(torch.cat(parts), drawn, temperature, top_p, seeds, index)


def finish_draws(draws: Draws, host: torch.Tensor) -> list[int]:
    """`draws.device` read to the host -> the S token ids. Row i's draw is seeded by
    (seeds[i], index[i])."""
    S, n = len(draws.temperature), len(draws.drawn)
    tokens = host[:S].long().tolist()
    if not n:
        return tokens
    gens = [torch.Generator().manual_seed(draws.seeds[i] * 1_000_003 + draws.index[i]) for i in draws.drawn]
    u = torch.cat([torch.rand(1, generator=g, dtype=torch.float64) for g in gens])
    picked = _nucleus(host[S:].view(n, -1), torch.tensor([draws.temperature[i] for i in draws.drawn], dtype=torch.float64),
                      torch.tensor([draws.top_p[i] for i in draws.drawn], dtype=torch.float64), u)
    for i, t in zip(draws.drawn, picked.tolist()):
        tokens[i] = t
    return tokens


def _nucleus(logits: torch.Tensor, temperature: torch.Tensor, top_p: torch.Tensor,
             u: torch.Tensor) -> torch.Tensor:
    """Inverse-CDF draw per row: logits `[n, V]`, temperature, top_p, u (uniform in [0, 1)) `[n]`."""
    probs = (logits.double().cpu() / temperature[:, None]).softmax(dim=-1)
    sorted_p, sorted_ids = probs.sort(dim=-1, descending=True)
    cdf = sorted_p.cumsum(dim=-1)
    # top-p: keep the smallest prefix whose mass reaches top_p (always at least one token)
    keep = (cdf - sorted_p) < top_p[:, None]
    sorted_p = sorted_p * keep
    cdf = sorted_p.cumsum(dim=-1)
    u = u * cdf[:, -1]
    choice = torch.searchsorted(cdf, u.unsqueeze(-1)).clamp(max=probs.shape[-1] - 1)
    return sorted_ids.gather(-1, choice).squeeze(-1)
