"""Rank 0's record of the requests in flight and of the tokens streamed for each, against which
a recovery reconciles what the survivors' schedulers hold (`Ledger.reconcile`): a request the
dead rank held lost its KV cache, so it is recomputed from its prompt plus what the client
already has, and goes on from the next token: no gap, no token twice."""

from __future__ import annotations

from dataclasses import replace

from expertmesh.engine.request import Request, TokenOutput


class Ledger:
    def __init__(self) -> None:
        self.requests: dict = {}  # request id -> the request as submitted
        self.streamed: dict = {}  # request id -> the tokens sent out for it

    def add(self, request: Request) -> None:
        self.requests[request.id] = request
        self.streamed[request.id] = []

    def drop(self, request_id) -> None:
        self.requests.pop(request_id, None)
        self.streamed.pop(request_id, None)

    def record(self, outputs: list[TokenOutput]) -> None:
        """A step's outputs, as streamed."""
        for out in outputs:
            if out.request_id in self.streamed:
                self.streamed[out.request_id].append(out.token)
                if out.finished:
                    self.drop(out.request_id)

    def reconcile(self, held: dict, queued: set, caught_up: list[TokenOutput] = ()
                  ) -> tuple[list[TokenOutput], list[Request], list]:
        """`held`: what the survivors' schedulers hold, {request id: tokens generated so far};
        `queued`: ids the engine holds for its next step anyway; `caught_up`: the outputs of the
        steps a pipeline caught up (`elastic/slots.py`), finished ones included, whose tokens
        `held` holds too. Returns (the outputs of tokens a survivor generated that were never
        streamed, recorded here as streamed; the requests to re-queue: in flight, neither held
        nor queued, each with `generated` set to the tokens streamed, in the order they came;
        the held ids no longer in flight, to abort)."""
        outputs = [o for o in caught_up if o.request_id in self.streamed
                   and o.index == len(self.streamed[o.request_id])]  # not streamed before the loss
        self.record(outputs)
        for i, tokens in held.items():
            sent = self.streamed.get(i)
            if sent is not None:
                fresh = [TokenOutput(i, t, n) for n, t in enumerate(tokens) if n >= len(sent)]
                self.record(fresh)
                outputs += fresh
        requeue = [replace(r, generated=tuple(self.streamed[i]))
                   for i, r in self.requests.items() if i not in queued and i not in held]
        return outputs, requeue, [i for i in held if i not in self.requests]
