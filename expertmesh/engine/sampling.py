"""Choosing the next token from logits: greedy, or temperature / top-p with seeded randomness.

The random draw for a sequence depends only on (seed, step, global sequence index), never on how
sequences are split over ranks, so every deployment samples the same tokens from the same logits.
"""

from __future__ import annotations

import torch

from expertmesh.config import Workload


def sample(logits: torch.Tensor, rows: torch.Tensor, step: int, workload: Workload) -> torch.Tensor:
    """logits `[b, V]` of the sequences with global indices `rows [b]` -> token ids `[b]` (int64)."""
    if workload.temperature == 0:
        return logits.argmax(dim=-1)
    gen = torch.Generator().manual_seed(workload.seed * 1_000_003 + step)
    u = torch.rand(workload.batch_size, generator=gen, dtype=torch.float64)[rows.cpu()]
    probs = (logits.double() / workload.temperature).softmax(dim=-1).cpu()
    sorted_p, sorted_ids = probs.sort(dim=-1, descending=True)
    cdf = sorted_p.cumsum(dim=-1)
    # top-p: keep the smallest prefix whose mass reaches top_p (always at least one token)
    keep = (cdf - sorted_p) < workload.top_p
    sorted_p = sorted_p * keep
    cdf = sorted_p.cumsum(dim=-1)
    u = u * cdf[:, -1]
    choice = torch.searchsorted(cdf, u.unsqueeze(-1)).clamp(max=probs.shape[-1] - 1)
    return sorted_ids.gather(-1, choice).squeeze(-1).to(logits.device)
