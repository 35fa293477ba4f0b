"""The rows of a micro-batch that draw a token, and their requests' sampling values, kept from
step to step.

A run of decode steps samples the same sequences every step: their requests' values
(temperature, top-p, top-k, seed, logprobs, whether the logits are processed) are the same, so
they are gathered once, when the micro-batch's sequences change, not walked again for each of its
128 rows at every step. Only each row's draw index (its tokens generated so far) moves, and it is
read only when some row draws at random.
"""

from __future__ import annotations

from expertmesh.engine.logits_processing import processes
from expertmesh.engine.scheduler import Sequence


class SamplingRows:
    """Of `chosen` (a micro-batch's (sequence, new tokens), in batch order) those whose `sampled`
    is true: `rows` (their indices in the micro-batch), `seqs`, `reqs`, and per row the values
    `sample_requests` takes; `processed`: some row's logits are processed first
    (`engine/logits_processing.py`); `logprobs`: each row's k or None, `asks_logprobs`: some k."""

    def __init__(self, chosen: list[tuple[Sequence, int]], sampled: list[bool]):
        self.chosen, self.sampled = chosen, sampled
        self.rows = [i for i, s in enumerate(sampled) if s]
        self.seqs = [chosen[i][0] for i in self.rows]
        reqs = self.reqs = [seq.request for seq in self.seqs]
        self.temperature = [r.temperature for r in reqs]
        self.top_p = [r.top_p for r in reqs]
        self.top_k = [r.top_k for r in reqs]
        self.seeds = [r.seed for r in reqs]
        self.draws = any(t > 0 for t in self.temperature)
        self.processed = any(processes(r) for r in reqs)
        self.logprobs = [r.logprobs for r in reqs]
        self.asks_logprobs = any(k is not None for k in self.logprobs)

    @classmethod
    def reuse(cls, last: SamplingRows | None, chosen: list[tuple[Sequence, int]], sampled: list[bool]) -> SamplingRows:
        """`last` when it was built for the same sequences with the same tokens and draws (a list
        comparison, by identity of each sequence), else new ones."""
        if last is not None and last.chosen == chosen and last.sampled == sampled:
            return last
        return cls(chosen, sampled)

    def index(self) -> list[int]:
        """Each row's draw index (tokens its request generated): what its uniform number hashes
        with a random draw; greedy rows' never is (0 each when no row draws)."""
        if not self.draws:
            return [0] * len(self.seqs)
        return [seq.generated for seq in self.seqs]
