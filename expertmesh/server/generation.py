"""One request in flight as its HTTP handler sees it: the queue its tokens arrive on (from
`server/frontend.py: EngineClient`), their text with the UTF-8 and stop-string hold-back
(`TextStream`), its finish reason, and its outcome counted when it closes.
"""

from __future__ import annotations

import asyncio
import time

from expertmesh.engine.request import Request
from expertmesh.server.protocol import ApiError


class EngineStopped(RuntimeError):
    """What an open request gets when the engine ends before it does (503, or an error event)."""


class TextStream:
    """Generated ids -> text deltas, cut at the first stop string (which is not returned)."""

    def __init__(self, tokenizer, stops: list[str]):
        self.tokenizer, self.stops = tokenizer, stops
        self.hold = max((len(s) for s in stops), default=1) - 1
        self.ids: list[int] = []
        self.sent = 0
        self.stopped = False

    def add(self, token: int, last: bool) -> str:
        self.ids.append(token)
        if self.tokenizer is None:
            return ""
        text = self.tokenizer.decode(self.ids, skip_special_tokens=True)
        hits = [i for i in (text.find(s) for s in self.stops) if i >= 0]
        if hits:
            text, self.stopped, last = text[:max(min(hits), self.sent)], True, True
        # An incomplete UTF-8 character decodes to U+FFFD: hold it back until the rest arrives.
        end = len(text) if last else max(self.sent, len(text) - self.hold - text.endswith("\ufffd"))
        delta, self.sent = text[self.sent:end], end
        return delta


class Generation:
    """One request in flight, as its handler sees it."""

    def __init__(self, api, request: Request, stops: list[str], submit: bool = True):
        """`api`: the API server's `server/app.py: Api` (tokenizer, engine client, metrics).
        `submit`: send it to the engine now, else at `submit()`."""
        self.api, self.request = api, request
        self.text = TextStream(api.tokenizer, stops)
        self.accepted = time.perf_counter()
        self.times: list[float] = []
        self.reason: str | None = None
        self.cached = 0  # prompt tokens found in the prefix cache (told with the first token)
        self.queue: asyncio.Queue = asyncio.Queue()
        self.submitted = False
        if submit:
            self.submit()

    def submit(self) -> None:
        self.submitted = True
        self.api.waiting += 1
        self.api.engine.submit(self.request, self.queue)

    async def pieces(self):
        """(text delta, new token ids, finish reason or None, the token's logprobs or None) as
        tokens arrive; raises ApiError when the engine ends first."""
        while self.reason is None:
            item = await self.queue.get()
            if isinstance(item, EngineStopped):
                raise ApiError(503, f"the request was ended: {item}", kind="server_error")
            if isinstance(item, ValueError):  # the engine refused it (checked here already)
                raise ApiError(400, str(item).split(": ", 1)[-1])
            if not self.times:
                self.api.waiting -= 1
                self.cached = item.cached or 0
            self.times.append(time.perf_counter())
            delta = self.text.add(item.token, item.finished is not None)
            self.reason = "stop" if self.text.stopped else item.finished
            if self.text.stopped and item.finished is None:
                self.api.engine.abort(self.request.id)  # a stop string: the engine need not go on
            yield delta, [item.token], self.reason, item.logprobs

    def close(self, error: bool = False) -> None:
        """Count the outcome; abort the request if it is still running (its client left)."""
        if self.submitted and not self.times:
            self.api.waiting -= 1
        if self.submitted and self.reason is None:
            self.api.engine.abort(self.request.id)
        outcome = "error" if error else (self.reason or "abort")
        self.api.metrics.finished(outcome, self.accepted, self.times)
