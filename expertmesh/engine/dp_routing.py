"""Which data-parallel rank a new request goes to: rank 0 decides, from the step's gathered stats.

Two rules (`--dp-routing`):

- "load": the most free KV blocks, then the fewest queued (waiting + running) sequences, then
  the lowest index.
- "cache" (the default): among the ranks with room for the request (free blocks for the part of
  its prompt they do not cache), those whose work in tokens once it is added,
  `queued_tokens[i] + prompt tokens rank i would compute`, is within one step's budget
  (`slack`, the engine's max_batched_tokens) of the least, and whose queued sequences are
  within `seq_slack` (8) of the fewest; of those, the one that computes the fewest prompt
  tokens (the longest cached prefix); ties, no rank with room, and no rank passing both bounds,
  by the load rule. So a cached prefix counts as work saved, and more: a request follows its
  prefix unless that delays its prefill by more than a step over the rank that would start it
  soonest, or that rank already runs `seq_slack` more sequences than another. Requests sharing
  a prefix so land together unless that rank's queue is longer, in tokens, than the prefix plus
  a step's budget, or longer in sequences by `seq_slack`.

  The sequence bound is there because tokens undercount decodes: a decoding sequence queues
  only its remaining output tokens, yet it costs every step its attention over its whole
  context, and every EP rank waits for the slowest data-parallel rank. Without it, requests that
  all share one prefix would all decode on one rank while the others idle (the simulator's
  serving mode found it: ep16, 10k-token prompts half shared, 4 requests/s).

Rank 0 knows what each rank caches from each step's all-gather of stats (`engine/engine.py`):
every rank's pool adds the hashes it registered and evicted since the last step
(`BlockPool.take_changes`, 8-byte ints: a 1,024-token prefix at 16 tokens a block is 64 of them,
once), never a collective per request. Rank 0 also counts a request's prompt blocks as cached on
the rank it sends it to, at once (its prefill comes a step or more later, and the next request
with that prefix should follow it there); a rank's report of an eviction removes them. A
request aborted before its prefill leaves its hashes behind, never reported evicted: a stale hint
that can only misplace a later request, never change its tokens.

Each choice takes the request's blocks and tokens from its rank before the next is made.
"""

from __future__ import annotations

from expertmesh.engine.block_pool import chain_hashes, short
from expertmesh.engine.request import Request
from expertmesh.engine.scheduler import EngineConfig

RULES = ("cache", "load")


def by_load(free: list[int], queued: list[int], candidates) -> int:
    return min(candidates, key=lambda i: (-free[i], queued[i], i))


class DpRouter:
    """Rank 0's view of `dp` ranks' prefix caches, and the rule that places requests."""

    def __init__(self, dp: int, block_size: int, key: bytes, rule: str = "cache", slack: int = 512,
                 seq_slack: int = 8):
        if rule not in RULES:
            raise ValueError(f"unknown --dp-routing {rule!r}; use one of {', '.join(RULES)}")
        self.block_size, self.key, self.rule, self.slack = block_size, key, rule, slack
        self.seq_slack = seq_slack
        self.views: list[set[int]] = [set() for _ in range(dp)]

    @classmethod
    def for_engine(cls, dp: int, engine_cfg: EngineConfig, key: bytes) -> DpRouter:
        """The router an engine (or the simulator's replica of one) uses: `engine_cfg.dp_routing`
        with prefix caching, else the load rule (no pool caches anything to follow), one step's
        `max_batched_tokens` as the slack."""
        rule = engine_cfg.dp_routing if engine_cfg.prefix_caching else "load"
        return cls(dp, engine_cfg.block_size, key, rule, engine_cfg.max_batched_tokens)

    def learn(self, dp: int, added: list[int], evicted: list[int]) -> None:
        """A rank's step report: the block hashes its pool registered and evicted."""
        self.views[dp] -= set(evicted)
        self.views[dp] |= set(added)

    def assign(self, requests: list[Request], stats: list[dict]) -> list[int]:
        """The data-parallel rank of each request, in order (`stats`: each rank's last report)."""
        if len(self.views) == 1:
            return [0] * len(requests)
        free = [s.blocks_free for s in stats]
        queued = [s.waiting + s.running for s in stats]
        tokens = [s.queued_tokens for s in stats]
        out = []
        for r in requests:
            n = len(r.prompt)
            hashes = [short(h) for h in chain_hashes(r.prompt, self.block_size, self.key, [])]
            usable = (n - 1) // self.block_size  # at least the last token is computed
            hits = [self._hits(view, hashes[:usable]) if self.rule == "cache" else 0 for view in self.views]
            need = [-(-n // self.block_size) - h for h in hits]
            roomy = [i for i in range(len(free)) if free[i] >= need[i]]
            if self.rule == "cache" and roomy:
                work = [tokens[i] + n - hits[i] * self.block_size for i in range(len(free))]
                least_work, fewest = min(work[i] for i in roomy), min(queued[i] for i in roomy)
                soon = [i for i in roomy
                        if work[i] <= least_work + self.slack and queued[i] <= fewest + self.seq_slack]
                longest = [i for i in soon if hits[i] == max(hits[j] for j in soon)]
                dp = by_load(free, queued, longest or roomy)
            else:
                dp = by_load(free, queued, range(len(free)))
            free[dp] -= need[dp]
            queued[dp] += 1
            tokens[dp] += n - hits[dp] * self.block_size + r.max_tokens
            if self.rule == "cache":
                self.views[dp].update(hashes)
            out.append(dp)
        return out

    @staticmethod
    def _hits(view: set[int], hashes: list[int]) -> int:
        """Leading blocks of `hashes` in `view`."""
        k = 0
        while k < len(hashes) and hashes[k] in view:
            k += 1
        return k
