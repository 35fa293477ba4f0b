"""Split n items into near-equal contiguous parts (sequences over ranks, tokens over chunks)."""

from __future__ import annotations


def split_evenly(n: int, parts: int) -> list[slice]:
    """`parts` contiguous slices of range(n), sizes differing by at most one, larger first (some
    may be empty)."""
    base, extra = divmod(n, parts)
    bounds = [0]
    for i in range(parts):
        bounds.append(bounds[-1] + base + (1 if i < extra else 0))
    return [slice(bounds[i], bounds[i + 1]) for i in range(parts)]
