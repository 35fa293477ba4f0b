"""The HTTP API on rank 0 (FastAPI): OpenAI completions and chat completions, streamed as
server-sent events (sse-starlette) or not, models, health and Prometheus metrics.

A handler turns the body into token ids (the checkpoint's tokenizer, or ids as given), checks
the request against the model and the KV pool (400 naming the field), refuses it when
`max_waiting` requests are already waiting for their first token (429), then submits it to the
`EngineLoop` and reads its tokens from an asyncio queue the engine thread fills with
`call_soon_threadsafe`. Text is the decoding of all tokens so far, sent as it grows; while stop
strings are set, the last characters that could begin one are held back until it is decided.
A streamed request whose client goes away is aborted (its KV blocks are freed at the next step).
"""

from __future__ import annotations

import asyncio
import json
import random
import time
from dataclasses import dataclass, field

from fastapi import FastAPI
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST
from sse_starlette import EventSourceResponse

from expertmesh.config import ModelConfig
from expertmesh.engine.request import Request, TokenOutput
from expertmesh.engine.scheduler import Scheduler
from expertmesh.server.loop import EngineLoop, EngineStopped
from expertmesh.server.metrics import ServerMetrics
from expertmesh.server.protocol import (ApiError, ChatRequest, CompletionRequest, chat_body,
                                        completion_body, new_id, usage, validation_error)


@dataclass
class Api:
    """What the handlers share. `tokenizer`: transformers' tokenizer of the checkpoint, or None
    (token-id prompts only). `scheduler`: checks that a request fits the KV pool."""

    name: str
    cfg: ModelConfig
    loop: EngineLoop
    scheduler: Scheduler
    metrics: ServerMetrics
    tokenizer: object | None = None
    max_waiting: int = 256
    timeout_s: float = 600.0
    grace_s: float = 30.0  # what a stream gets to finish once the server is stopping
    waiting: int = 0  # accepted requests without their first token yet
    created: int = field(default_factory=lambda: int(time.time()))

    def healthy(self) -> str | None:
        """None when every rank answers; else why not."""
        if self.loop.failure is not None:
            return f"engine failed: {self.loop.failure}"
        if self.loop.stopping or not self.loop.thread.is_alive():
            return "shutting down"
        if self.loop.stuck_for() > self.timeout_s:
            return f"a step has taken over {self.timeout_s:.0f} s"
        return None


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

    def __init__(self, api: Api, request: Request, stops: list[str]):
        self.api, self.request = api, request
        self.text = TextStream(api.tokenizer, stops)
        self.accepted = time.perf_counter()
        self.times: list[float] = []
        self.reason: str | None = None
        self.queue: asyncio.Queue = asyncio.Queue()
        loop = asyncio.get_running_loop()

        def sink(item: TokenOutput | BaseException) -> None:
            try:
                loop.call_soon_threadsafe(self.queue.put_nowait, item)
            except RuntimeError:  # the event loop has closed: nobody is listening any more
                pass

        api.waiting += 1
        api.loop.submit(request, sink)

    async def pieces(self):
        """(text delta, new token ids, finish reason or None) as tokens arrive; raises ApiError
        when the engine ends first."""
        while self.reason is None:
            item = await self.queue.get()
            if isinstance(item, BaseException):
                status = 503 if isinstance(item, EngineStopped) else 500
                raise ApiError(status, f"the request was ended: {item}", kind="server_error")
            if not self.times:
                self.api.waiting -= 1
            self.times.append(time.perf_counter())
            delta = self.text.add(item.token, item.finished is not None)
            self.reason = "stop" if self.text.stopped else item.finished
            if self.text.stopped and item.finished is None:
                self.api.loop.abort(self.request.id)  # a stop string: the engine need not go on
            yield delta, [item.token], self.reason

    def close(self, error: bool = False) -> None:
        """Count the outcome; abort the request if it is still running (its client left)."""
        if not self.times:
            self.api.waiting -= 1
        if self.reason is None and not error:
            self.api.loop.abort(self.request.id)
        outcome = "error" if error else (self.reason or "abort")
        self.api.metrics.finished(outcome, self.accepted, self.times)

    def usage(self) -> dict:
        return usage(len(self.request.prompt), len(self.text.ids))


def create_app(api: Api) -> FastAPI:
    app = FastAPI(title="expertmesh", docs_url=None, redoc_url=None)

    @app.exception_handler(RequestValidationError)
    async def invalid(_, exc: RequestValidationError):
        api.metrics.requests.labels("rejected").inc()
        return validation_error(exc.errors()).response()

    @app.exception_handler(ApiError)
    async def refused(_, exc: ApiError):
        api.metrics.requests.labels("queue_full" if exc.status == 429 else "rejected").inc()
        return exc.response()

    @app.get("/health")
    async def health():
        problem = api.healthy()
        return JSONResponse({"status": problem or "ok"}, status_code=503 if problem else 200)

    @app.get("/metrics")
    async def metrics():
        return Response(api.metrics.render(), media_type=CONTENT_TYPE_LATEST)

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": api.name, "object": "model", "created": api.created,
                                            "owned_by": "expertmesh", "max_model_len": api.cfg.max_seq_len}]}

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest):
        ids = _prompt_ids(api, body.prompt)
        gen = _start(api, body, ids, default_max=16, prefix="cmpl")

        def piece(delta, new, reason, final):
            return completion_body(gen.request.id, api.name, delta, new, reason,
                                   gen.usage() if final else None, chunk=True)
        if body.stream:
            return _stream(api, _events(gen, piece, body.include_usage, first=None))
        text, reason = await _collect(gen)
        return completion_body(gen.request.id, api.name, text, gen.text.ids, reason, gen.usage(), chunk=False)

    @app.post("/v1/chat/completions")
    async def chat(body: ChatRequest):
        ids = _chat_ids(api, body)
        gen = _start(api, body, ids, default_max=api.cfg.max_seq_len - len(ids), prefix="chatcmpl")

        def piece(delta, new, reason, final):
            return chat_body(gen.request.id, api.name, delta, new, reason,
                             gen.usage() if final else None, chunk=True)
        if body.stream:
            first = chat_body(gen.request.id, api.name, "", [], None, None, chunk=True, first=True)
            return _stream(api, _events(gen, piece, body.include_usage, first=first))
        text, reason = await _collect(gen)
        return chat_body(gen.request.id, api.name, text, gen.text.ids, reason, gen.usage(), chunk=False)

    return app


def _prompt_ids(api: Api, prompt) -> list[int]:
    if isinstance(prompt, list):
        return prompt
    if api.tokenizer is None:
        raise ApiError(400, f"model {api.name!r} has no tokenizer, so a text prompt cannot be "
                            f"encoded; send token ids (a list of integers) as the prompt", param="prompt")
    return api.tokenizer(prompt).input_ids


def _chat_ids(api: Api, body: ChatRequest) -> list[int]:
    if api.tokenizer is None or not getattr(api.tokenizer, "chat_template", None):
        what = "no tokenizer" if api.tokenizer is None else "no chat template"
        raise ApiError(400, f"model {api.name!r} has {what}, so chat messages cannot be rendered; "
                            f"use /v1/completions", param="messages")
    messages = [{"role": m.role, "content": m.text()} for m in body.messages]
    return list(api.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True,
                                                  return_dict=True)["input_ids"])


def _start(api: Api, body, ids: list[int], default_max: int, prefix: str) -> Generation:
    """Check the request against the model and the pool, and submit it (or raise ApiError)."""
    if body.model != api.name:
        raise ApiError(400, f"model {body.model!r} is not served here; use {api.name!r} "
                            f"(GET /v1/models)", param="model")
    if body.stop_strings and api.tokenizer is None:
        raise ApiError(400, f"model {api.name!r} has no tokenizer, so stop strings cannot be "
                            f"matched; use stop_token_ids", param="stop")
    seed = body.seed if body.seed is not None else random.getrandbits(31)
    try:
        request = Request(new_id(prefix), tuple(ids), body.max_tokens or max(1, default_max),
                          stop=tuple(body.stop_token_ids), temperature=body.temperature,
                          top_p=body.top_p, seed=seed)
        request.check_for(api.cfg.vocab_size, api.cfg.max_seq_len)
        api.scheduler.check(request)
    except ValueError as exc:
        message = str(exc).split(": ", 1)[-1]  # the engine names the request by its id
        raise ApiError(400, message, param="max_tokens" if "max_tokens=" in message else "prompt") from None
    if api.waiting >= api.max_waiting:
        raise ApiError(429, f"{api.waiting} requests are already waiting (--max-waiting "
                            f"{api.max_waiting}); retry later", kind="rate_limit_exceeded")
    return Generation(api, request, body.stop_strings)


async def _collect(gen: Generation) -> tuple[str, str]:
    """A whole answer."""
    text, error = [], False
    try:
        async for delta, _, reason in gen.pieces():
            text.append(delta)
        return "".join(text), reason
    except ApiError:
        error = True
        raise
    finally:
        gen.close(error)


def _stream(api: Api, events) -> EventSourceResponse:
    # sse-starlette ends every stream when uvicorn starts shutting down, unless given a grace.
    return EventSourceResponse(events, shutdown_grace_period=api.grace_s)


async def _events(gen: Generation, piece, include_usage: bool, first: dict | None):
    """The server-sent events of a streamed answer, ending with `[DONE]` (or an error event)."""
    error = False
    try:
        if first is not None:
            yield {"data": json.dumps(first)}
        async for delta, new, reason in gen.pieces():
            yield {"data": json.dumps(piece(delta, new, reason, False))}
        if include_usage:
            last = piece("", [], None, True)
            last["choices"] = []
            yield {"data": json.dumps(last)}
        yield {"data": "[DONE]"}
    except ApiError as exc:
        error = True
        yield {"data": json.dumps(exc.body())}
    finally:
        gen.close(error)
