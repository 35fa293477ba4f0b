"""The run metrics, defined once (DESIGN.md) and computed from one event log.

Event log of a run: `start` (the batch is submitted) and `step_times[i]`, the moment token i of
every sequence in the batch has been sampled (i = 0 is the first token, produced by prefill).
Times are wall-clock seconds from a monotonic clock; warm-up runs are never part of the log.

- TTFT: step_times[0] - start.
- TPOT: mean time between consecutive output tokens after the first,
  (step_times[-1] - step_times[0]) / (gen_len - 1); undefined (None) when gen_len == 1.
- prefill TPS: prompt tokens / TTFT.
- decode TPS: tokens generated after the first / (step_times[-1] - step_times[0]).
- overall TPS: (prompt + generated tokens) / (step_times[-1] - start).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Sequence


@dataclass(frozen=True)
class Metrics:
    batch_size: int
    prompt_len: int
    gen_len: int
    ttft_s: float
    tpot_s: float | None
    total_s: float
    prefill_tps: float
    decode_tps: float | None
    overall_tps: float

    @classmethod
    def from_events(cls, start: float, step_times: Sequence[float], batch_size: int,
                    prompt_len: int) -> "Metrics":
        if not step_times:
            raise ValueError("no token was generated, so there is nothing to measure")
        if any(b < a for a, b in zip([start, *step_times], step_times)):
            raise ValueError("event times must not decrease")
        gen_len = len(step_times)
        ttft = step_times[0] - start
        total = step_times[-1] - start
        decode_s = step_times[-1] - step_times[0]
        decode_tokens = batch_size * (gen_len - 1)
        return cls(
            batch_size=batch_size, prompt_len=prompt_len, gen_len=gen_len,
            ttft_s=ttft,
            tpot_s=decode_s / (gen_len - 1) if gen_len > 1 else None,
            total_s=total,
            prefill_tps=batch_size * prompt_len / ttft if ttft > 0 else float("inf"),
            decode_tps=decode_tokens / decode_s if gen_len > 1 and decode_s > 0 else None,
            overall_tps=batch_size * (prompt_len + gen_len) / total if total > 0 else float("inf"),
        )

    def to_dict(self) -> dict:
        return asdict(self)


def merge_step_times(per_rank: Sequence[tuple[float, Sequence[float]]]) -> tuple[float, list[float]]:
    """Event logs of the ranks that sample, each relative to its own start -> one log.

    A step is done when its slowest rank is done, so each step time is the max over ranks.
    Returns (0.0, step times relative to the common start).
    """
    relative = [[t - start for t in times] for start, times in per_rank]
    return 0.0, [max(column) for column in zip(*relative)]
