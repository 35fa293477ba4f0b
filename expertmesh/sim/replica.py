"""One replica's engine minus the forward pass: the engine's own scheduling, for the simulator.

Each data-parallel rank has the engine's `Scheduler` and its block pool (`engine/scheduler.py`,
`engine/block_pool.py`); rank 0 places new requests with the engine's `DpRouter`
(`engine/dp_routing.py`) from the stats of the last step, and learns what each pool cached and
evicted after it, as `engine/engine.py: Engine.step` does. So admission, chunked prefill,
preemption, prefix caching and routing are the engine's decisions, not a model of them; the
simulator only says how long each step takes (`sim/serving.py`). Nothing here holds a tensor:
each sampled token is token id 0 (a block's hash chains over its whole prefix, so equal tokens
after different prompts share nothing).
"""

from __future__ import annotations

from expertmesh.engine.dp_routing import DpRouter
from expertmesh.engine.request import Request, TokenOutput
from expertmesh.engine.scheduler import EngineConfig, Scheduler, Sequence

SAMPLED = 0  # the token id every step "samples"

Chosen = list[tuple[Sequence, int]]  # one rank's step: (sequence, new tokens), as `Scheduler.schedule`


class Replica:
    """`dp` data-parallel ranks, each scheduling under `engine` (its `num_blocks` per rank)."""

    def __init__(self, dp: int, engine: EngineConfig):
        if engine.num_blocks is None:
            raise ValueError("a simulated replica needs EngineConfig.num_blocks (blocks per rank)")
        self.schedulers = [Scheduler(engine, engine.num_blocks) for _ in range(dp)]
        self.router = DpRouter.for_engine(dp, engine, b"")
        self.stats = [s.stats() for s in self.schedulers]

    @property
    def has_work(self) -> bool:
        return any(s.has_work for s in self.schedulers)

    def check(self, request: Request) -> None:
        """Raise `RequestError` for a request no rank could ever finish (the engine's own check)."""
        self.schedulers[0].check(request)

    def step(self, new: list[Request]) -> list[Chosen]:
        """Place `new` and schedule one step: each rank's (sequence, new tokens)."""
        for dp, request in zip(self.router.assign(new, self.stats), new):
            self.schedulers[dp].add(request)
        return [s.schedule() if s.has_work else [] for s in self.schedulers]

    def finish(self, chosen: list[Chosen]) -> list[TokenOutput]:
        """Record the step `step` returned, each sampled token `SAMPLED`; the step's outputs. A
        rank that was idle and still is reports nothing new (its stats and pool did not change)."""
        outputs = []
        for dp, (scheduler, mine) in enumerate(zip(self.schedulers, chosen)):
            if not (mine or scheduler.has_work):
                continue
            sampled = {seq.request.id: SAMPLED for (seq, _), s in zip(mine, scheduler.sampled(mine)) if s}
            outputs += scheduler.finish(mine, sampled)
            self.stats[dp] = scheduler.stats()
            self.router.learn(dp, *scheduler.pool.take_changes())
        return outputs

    def totals(self) -> dict[str, int]:
        """Preemptions, prompt tokens and those found cached, over the ranks (`SchedulerStats`)."""
        return {name: sum(getattr(s, name) for s in self.stats)
                for name in ("preemptions", "prompt_tokens", "cached_tokens")}
