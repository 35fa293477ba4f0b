"""Rank 0's side of `expertmesh serve --elastic`, around its engine loop
(`server/engine_process.py: EngineServer`): the ledger of the tokens streamed for each request in
flight (`elastic/ledger.py`), the recovery from a lost rank and the admission of a joining one
(`elastic/recovery.py`), and what every front end hears of the ranks with each step.

In the loop, per step: `ask_join` before it; `after_step` records its tokens as streamed (or,
at a join's step boundary, admits the joiner); a step or the counters' collective after it that
fails on a lost rank ends in `recover`, whose tokens (the survivors' unstreamed ones) go out with
the step's; `news` is each front end's share of the message, `sent` after it went out.
"""

from __future__ import annotations

import sys

from expertmesh.elastic.ledger import Ledger
from expertmesh.elastic.recovery import Elastic
from expertmesh.engine.engine import Engine
from expertmesh.engine.request import TokenOutput
from expertmesh.model.transformer import MoETransformer
from expertmesh.server.ipc import RankState


class ElasticServing:
    def __init__(self, engine: Engine, model: MoETransformer, elastic: Elastic, ticket: str | None):
        """`ticket`: the file a joining process reads (`Elastic.write_ticket`)."""
        self.engine, self.model, self.elastic, self.ticket = engine, model, elastic, ticket
        self.ledger = Ledger()
        # every rank's state, sent with every step (a front end may connect late), and (ranks
        # lost, seconds, of them hung) of a recovery for front end 0 to count once
        self.rank_states = [RankState(**r) for r in elastic.ranks()]
        self.recovered = (0, 0.0, 0)

    def ask_join(self) -> None:
        """Between two steps: a process asking to join is admitted at the next step."""
        if self.engine.join is None:
            self.engine.join = self.elastic.join_request()

    def after_step(self, outputs: list[TokenOutput]) -> bool:
        """The step's outputs recorded as streamed; or, when the step was the boundary a rank
        joins at, the rank admitted: True then."""
        if self.engine.joined is None:
            self.ledger.record(outputs)
            return False
        self._admit(self.engine.joined)
        return True

    def recover(self, error: RuntimeError) -> list[TokenOutput]:
        """Survive a lost rank (raises `error` if none was lost): regroup, reconcile the requests
        in flight with what the survivors hold, log it, tell the front ends; returns the tokens
        survivors generated that were never streamed."""
        report = self.elastic.recover(self.engine, self.model, error)
        outputs, requeue, drop = self.ledger.reconcile(report.held, {r.id for r in self.engine.new},
                                                       report.outputs)
        self.engine.live -= {o.request_id for o in outputs if o.finished}
        self.engine.requeue(requeue, drop)
        print(report.describe(), file=sys.stderr, flush=True)
        self.rank_states = [RankState(**r) for r in self.elastic.ranks()]
        self.recovered = (len(report.lost), report.seconds, report.hung)
        return outputs

    def news(self, frontend: int) -> dict:
        """What front end `frontend`'s message carries of the ranks (`server/ipc.py: FromEngine`)."""
        lost, seconds, hung = self.recovered if frontend == 0 else (0, 0.0, 0)
        return dict(ranks=self.rank_states, lost=lost, recovery_s=seconds, hung=hung,
                    degraded=self.elastic.degraded, join=self.ticket, dp_ranks=self.elastic.labels)

    def sent(self) -> None:
        """The step's messages went out: a recovery is counted once."""
        self.recovered = (0, 0.0, 0)

    def _admit(self, join: tuple[int, int, str]) -> None:
        """A new rank joins: regroup with it, log it, tell the front ends (the requests in
        flight stay where they run; new ones may go to it)."""
        report = self.elastic.admit(self.engine, self.model, join)
        print(report.describe(), file=sys.stderr, flush=True)
        self.rank_states = [RankState(**r) for r in self.elastic.ranks()]
