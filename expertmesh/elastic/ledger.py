"""Rank 0's record of the requests in flight and of the tokens streamed for each, from which a
recovery re-queues them: a dead rank's KV cache is gone (and every survivor's scheduler starts
empty), so each request is recomputed from its prompt plus what the client already has, and
goes on from the next token: no gap, no token twice."""

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

    def in_flight(self, queued: set) -> list[Request]:
        """Every request not yet finished nor aborted, but not those of `queued` (ids the engine
        holds for its next step anyway), each with `generated` set to the tokens streamed, in
        the order they came."""
        return [replace(r, generated=tuple(self.streamed[i]))
                for i, r in self.requests.items() if i not in queued]
