"""Time of one sampling step on the device (`engine/sampling.py`): rows x vocabulary logits ->
token ids read on the host, for temperature 1 with and without top-p, and greedy.

    python benchmarks/sampling.py [--device cuda] [--rows 8,128] [--vocab 32000] [--reps 20]

Prints one line per (rows, mode): the median ms per step (the ids' read included, so the
device's work is finished when the clock stops).
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from expertmesh.engine.sampling import sample_requests

MODES = {"greedy": (0.0, 1.0), "temperature 1": (1.0, 1.0), "temperature 1, top-p 0.9": (1.0, 0.9)}


def time_sampling(device: str, rows: int, vocab: int, temperature: float, top_p: float,
                  reps: int = 20) -> float:
    """Median ms of one step: sample `rows` requests from logits `[rows, vocab]` (fp32, on
    `device`) and read the ids, after one warm-up step."""
    logits = torch.randn(rows, vocab, generator=torch.Generator().manual_seed(0)).mul(3).to(device)
    seeds = list(range(rows))
    times = []
    for step in range(reps + 1):
        start = time.perf_counter()
        sample_requests(logits, [temperature] * rows, [top_p] * rows, [0] * rows, seeds, [step] * rows).tolist()
        times.append(time.perf_counter() - start)
    return statistics.median(times[1:]) * 1e3


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cpu")
    p.add_argument("--rows", default="8,128")
    p.add_argument("--vocab", type=int, default=32000)
    p.add_argument("--reps", type=int, default=20)
    args = p.parse_args()
    for rows in (int(r) for r in args.rows.split(",")):
        for mode, (temperature, top_p) in MODES.items():
            ms = time_sampling(args.device, rows, args.vocab, temperature, top_p, args.reps)
            print(f"{rows:>4} rows x {args.vocab} vocab, {mode:<26} {ms:8.2f} ms/step")


if __name__ == "__main__":
    main()
