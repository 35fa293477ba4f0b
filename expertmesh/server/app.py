"""The HTTP API of an API server process (FastAPI): OpenAI completions and chat completions,
streamed as server-sent events (sse-starlette) or not, models, health and Prometheus metrics.

A handler turns the body into token ids (the checkpoint's tokenizer, in a thread of its own so
that the event loop goes on, or ids as given), checks the request against the model and the KV
pool (400 naming the field), refuses it when `max_waiting` requests of this process are already
waiting for their first token (429), then submits it to the engine (`frontend.EngineClient`) and
reads its tokens from an asyncio queue. Text is the decoding of all tokens so far, sent as it
grows; while stop strings are set, the last characters that could begin one are held back until
it is decided. A request whose client goes away, streamed or not, is aborted (its KV blocks are
freed at the next step). With an API key set, every /v1 route wants `Authorization: Bearer KEY`
(401 otherwise); /health and /metrics stay open.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

from fastapi import Depends, FastAPI
from fastapi import Request as HttpRequest
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST
from sse_starlette import EventSourceResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from expertmesh.engine.request import RequestError
from expertmesh.engine.scheduler import Scheduler
from expertmesh.server.choices import Choices, requests
from expertmesh.server.generation import Generation
from expertmesh.server.metrics import ServerMetrics, render
from expertmesh.server.protocol import (ApiError, ChatRequest, CompletionRequest, chat_body,
                                        completion_body, new_id, validation_error)


CLIENT_GONE = 499  # nginx's status for a client that closed the connection first; nobody reads it
SHUTDOWN_MARGIN_S = 5.0  # after `--grace`, what ended requests get to send their error
HTTP_NAMES = {"stop": "stop_token_ids"}  # engine Request fields named otherwise in the OpenAI body
CHARS_PER_TOKEN = 16  # the most characters of text counted per token of the context (`_fits`)


@dataclass(frozen=True)
class Limits:
    """What one request may hold: its body in bytes, stop strings and stop ids (each), and the
    characters of all its stop strings. Every stop id and string is checked at every step."""

    body_bytes: int = 8 * 2**20
    stops: int = 64
    stop_chars: int = 4096

    def __post_init__(self) -> None:
        for name, flag in (("body_bytes", "--max-body-mb"), ("stops", "--max-stops"),
                           ("stop_chars", "--max-stop-chars")):
            value = getattr(self, name)
            if not (isinstance(value, int) and value >= 1):
                raise ValueError(f"{flag} gives {value!r}; it must be a positive number")


@dataclass
class Api:
    """What the handlers share. `engine`: a `frontend.EngineClient`. `tokenizer`: transformers'
    tokenizer of the checkpoint, or None (token-id prompts only). `scheduler`: a replica of the
    engine's, which checks that a request fits the KV pool. `server`: the uvicorn server."""

    name: str
    vocab_size: int
    max_len: int
    engine: object
    scheduler: Scheduler
    metrics: ServerMetrics
    tokenizer: object | None = None
    max_waiting: int = 256
    timeout_s: float = 600.0
    grace_s: float = 30.0  # what a stream gets to finish once the server is stopping
    api_key: str | None = None
    limits: Limits = field(default_factory=Limits)
    server: object | None = None
    waiting: int = 0  # accepted requests without their first token yet
    created: int = field(default_factory=lambda: int(time.time()))
    # One thread encodes text, in turn: the event loop goes on meanwhile, and the tokenizer is
    # never called from two threads at once.
    encoder: ThreadPoolExecutor = field(default_factory=lambda: ThreadPoolExecutor(1, "tokenize"))

    def healthy(self) -> str | None:
        """None when the engine steps; else why not."""
        if self.engine.failure is not None:
            return self.engine.failure
        if self.server is not None and self.server.should_exit:
            return "shutting down"
        quiet = time.monotonic() - self.engine.last_heard
        if quiet > self.timeout_s:
            return f"no engine step has ended for {quiet:.0f} s"
        return None

    async def encode(self, fn, *args):
        return await asyncio.get_running_loop().run_in_executor(self.encoder, fn, *args)


class BodyLimit:
    """A body over `limit` bytes is a 413: at once when its content-length says so, else when the
    bytes read pass it. (FastAPI's own `max_body_size` answers in plain text.)"""

    def __init__(self, app, limit: int):
        self.app, self.limit = app, limit

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        declared = dict(scope["headers"]).get(b"content-length", b"")
        if declared.isdigit() and int(declared) > self.limit:
            return await _too_large(self.limit).response()(scope, receive, send)
        seen = 0

        async def counted():
            nonlocal seen
            message = await receive()
            seen += len(message.get("body", b""))
            if seen > self.limit:
                raise StarletteHTTPException(413)  # answered by `create_app`'s handler
            return message
        await self.app(scope, counted, send)


def _too_large(limit: int) -> ApiError:
    return ApiError(413, f"the body is over {limit} bytes (--max-body-mb)")


def create_app(api: Api) -> FastAPI:
    app = FastAPI(title="expertmesh", docs_url=None, redoc_url=None)
    app.add_middleware(BodyLimit, limit=api.limits.body_bytes)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(_, exc: StarletteHTTPException):
        """FastAPI's own refusals (unknown route, body too large or not JSON) in OpenAI's format."""
        api.metrics.requests.labels("rejected").inc()
        if exc.status_code == 413:
            return _too_large(api.limits.body_bytes).response()
        message = "the body is not valid JSON" if exc.status_code == 400 else str(exc.detail)
        kind = "invalid_request_error" if exc.status_code < 500 else "server_error"
        return ApiError(exc.status_code, message, kind=kind).response()

    @app.exception_handler(Exception)
    async def failed(_, exc: Exception):
        """A bug: the client gets no traceback and no path (the log has them)."""
        api.metrics.requests.labels("error").inc()
        return ApiError(500, "internal server error; the server's log has the details",
                        kind="server_error").response()

    @app.exception_handler(RequestValidationError)
    async def invalid(_, exc: RequestValidationError):
        api.metrics.requests.labels("rejected").inc()
        return validation_error(exc.errors()).response()

    @app.exception_handler(ApiError)
    async def refused(_, exc: ApiError):
        outcome = {401: "unauthorized", 429: "queue_full"}.get(exc.status, "rejected")
        api.metrics.requests.labels("error" if exc.status >= 500 else outcome).inc()
        return exc.response()

    async def authorized(http: HttpRequest) -> None:
        if api.api_key is None:
            return
        given = http.headers.get("authorization", "").encode()
        if not hmac.compare_digest(given, f"Bearer {api.api_key}".encode()):
            raise ApiError(401, "a valid API key is required: send the header 'Authorization: Bearer "
                                "KEY' (the server's --api-key)", code="invalid_api_key")

    @app.get("/health")
    async def health():
        problem = api.healthy()
        body = {"status": problem or "ok"}
        if api.engine.ranks is not None:  # elastic: every rank's state; degraded below its size
            body["ranks"] = [{"rank": r.rank, "pid": r.pid, "state": r.state} for r in api.engine.ranks]
            body["degraded"] = api.engine.degraded
        return JSONResponse(body, status_code=503 if problem else 200)

    @app.get("/admin/join")
    async def join(http: HttpRequest):
        """Where `serve --join` finds what it needs: a file only this user can read, on this
        machine (the joining process must run here)."""
        await authorized(http)
        if api.engine.join is None:
            raise ApiError(404, "this server is not elastic (start it with --elastic): no rank can "
                                "join it", code="not_elastic")
        return JSONResponse({"ticket": api.engine.join})

    @app.get("/metrics")
    async def metrics():
        return Response(render(), media_type=CONTENT_TYPE_LATEST)

    @app.get("/v1/models", dependencies=[Depends(authorized)])
    async def models():
        return {"object": "list", "data": [{"id": api.name, "object": "model", "created": api.created,
                                            "owned_by": "expertmesh", "max_model_len": api.max_len}]}

    @app.post("/v1/completions", dependencies=[Depends(authorized)])
    async def completions(body: CompletionRequest, http: HttpRequest):
        ids = await _prompt_ids(api, body.prompt)
        gen = _start(api, body, ids, default_max=16, prefix="cmpl")

        def piece(choices, final):
            return completion_body(gen.id, api.name, choices, gen.usage() if final else None, chunk=True)
        if body.stream:
            return _stream(api, _events(gen, piece, body.include_usage, first=None))
        if not await _collect(gen, http):
            return Response(status_code=CLIENT_GONE)
        return completion_body(gen.id, api.name, gen.whole_choices(), gen.usage(), chunk=False)

    @app.post("/v1/chat/completions", dependencies=[Depends(authorized)])
    async def chat(body: ChatRequest, http: HttpRequest):
        ids = await _chat_ids(api, body)
        gen = _start(api, body, ids, default_max=api.max_len - len(ids), prefix="chatcmpl")

        def piece(choices, final):
            return chat_body(gen.id, api.name, choices, gen.usage() if final else None, chunk=True)
        if body.stream:
            first = chat_body(gen.id, api.name, gen.first_choices(), None, chunk=True)
            return _stream(api, _events(gen, piece, body.include_usage, first=first))
        if not await _collect(gen, http):
            return Response(status_code=CLIENT_GONE)
        return chat_body(gen.id, api.name, gen.whole_choices(), gen.usage(), chunk=False)

    return app


def _fits(api: Api, chars: int, param: str) -> None:
    """Refuse text that cannot fit the model before tokenizing it: a token holds at most
    `CHARS_PER_TOKEN` characters (runs of spaces aside), so longer text is too many tokens."""
    if chars > api.max_len * CHARS_PER_TOKEN:
        raise ApiError(400, f"{chars} characters of text cannot fit the model's {api.max_len} tokens "
                            f"(at most {CHARS_PER_TOKEN} characters per token are counted)", param=param)


async def _prompt_ids(api: Api, prompt) -> list[int]:
    if isinstance(prompt, list):
        return prompt
    if api.tokenizer is None:
        raise ApiError(400, f"model {api.name!r} has no tokenizer, so a text prompt cannot be "
                            f"encoded; send token ids (a list of integers) as the prompt", param="prompt")
    _fits(api, len(prompt), "prompt")
    try:
        return (await api.encode(api.tokenizer, prompt)).input_ids
    except (TypeError, ValueError):  # e.g. a lone surrogate, which is no UTF-8 text
        raise ApiError(400, "the prompt cannot be encoded as UTF-8 text", param="prompt") from None


async def _chat_ids(api: Api, body: ChatRequest) -> list[int]:
    if api.tokenizer is None or not getattr(api.tokenizer, "chat_template", None):
        what = "no tokenizer" if api.tokenizer is None else "no chat template"
        raise ApiError(400, f"model {api.name!r} has {what}, so chat messages cannot be rendered; "
                            f"use /v1/completions", param="messages")
    messages = [{"role": m.role, "content": m.text()} for m in body.messages]
    _fits(api, sum(len(m["content"]) for m in messages), "messages")

    def render_chat():
        return api.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True,
                                                 return_dict=True)["input_ids"]
    try:
        return list(await api.encode(render_chat))
    except (TypeError, ValueError):
        raise ApiError(400, "the messages cannot be encoded as UTF-8 text", param="messages") from None


def _start(api: Api, body, ids: list[int], default_max: int, prefix: str) -> Choices:
    """Check the request against the model and the pool, and submit its choices (or raise ApiError)."""
    if body.model != api.name:
        raise ApiError(400, f"model {body.model!r} is not served here; use {api.name!r} "
                            f"(GET /v1/models)", param="model")
    unsupported = body.unsupported()
    if unsupported is not None:
        raise ApiError(400, f"{unsupported} is not implemented by this server; leave it out",
                       param=unsupported)
    stops, limits = body.stop_strings, api.limits
    if len(stops) > limits.stops or sum(map(len, stops)) > limits.stop_chars:
        raise ApiError(400, f"{len(stops)} stop strings of {sum(map(len, stops))} characters: at most "
                            f"{limits.stops} (--max-stops) of {limits.stop_chars} (--max-stop-chars) "
                            f"in all", param="stop")
    if len(body.stop_token_ids) > limits.stops:
        raise ApiError(400, f"{len(body.stop_token_ids)} stop token ids: at most {limits.stops} "
                            f"(--max-stops)", param="stop_token_ids")
    if body.stop_strings and api.tokenizer is None:
        raise ApiError(400, f"model {api.name!r} has no tokenizer, so stop strings cannot be "
                            f"matched; use stop_token_ids", param="stop")
    outside = [t for t in body.stop_token_ids if not 0 <= t < api.vocab_size]
    if outside:
        raise ApiError(400, f"stop token id {outside[0]} is outside the vocabulary [0, {api.vocab_size})",
                       param="stop_token_ids")
    max_tokens = body.limit if body.limit is not None else max(1, default_max)
    rid = new_id(prefix)
    try:
        choices = requests(rid, ids, max_tokens, body.n, body.seed, stop=tuple(body.stop_token_ids),
                           temperature=body.temperature, top_p=body.top_p, **body.options())
        choices[0].check_for(api.vocab_size, api.max_len)
        api.scheduler.check(choices[0])
    except RequestError as exc:  # the engine names the field at fault; the HTTP body may call it otherwise
        raise ApiError(400, exc.reason, param=HTTP_NAMES.get(exc.field, exc.field)) from None
    if api.engine.failure is not None or (api.server is not None and api.server.should_exit):
        raise ApiError(503, f"the server is not taking requests: {api.healthy()}", kind="server_error")
    if api.waiting >= api.max_waiting:
        raise ApiError(429, f"{api.waiting} requests are already waiting (--max-waiting "
                            f"{api.max_waiting}); retry later", kind="rate_limit_exceeded")
    # With several choices and a prompt of full KV blocks, choices 1.. go to the engine once
    # choice 0 has its first token: its prompt's blocks are then in the prefix cache, which they
    # take instead of computing the prompt again (vLLM's V0 forked after the prefill the same way).
    later = len(choices) > 1 and api.scheduler.cfg.prefix_caching and len(ids) > api.scheduler.cfg.block_size
    gens = [Generation(api, r, body.stop_strings, submit=i == 0 or not later) for i, r in enumerate(choices)]
    return Choices(rid, gens, api.tokenizer,
                   isinstance(body, ChatRequest))


async def _whole(gen: Choices) -> bool:
    """A whole answer (kept by `gen`)."""
    error = False
    try:
        async for _ in gen.pieces():
            pass
        return True
    except ApiError:
        error = True
        raise
    finally:
        gen.close(error)


async def _client_left(http: HttpRequest) -> None:
    """Returns once the client has closed its connection (the body was read already)."""
    while (await http.receive())["type"] != "http.disconnect":
        pass


async def _collect(gen: Choices, http: HttpRequest) -> bool:
    """A whole answer (kept by `gen`); False if the client left first (the request is aborted)."""
    work = asyncio.create_task(_whole(gen))
    watch = asyncio.create_task(_client_left(http))
    try:
        await asyncio.wait([work, watch], return_when=asyncio.FIRST_COMPLETED)
    finally:
        watch.cancel()
        if not work.done():
            work.cancel()
    if work.cancelled():
        return False
    return work.result()


def _stream(api: Api, events) -> EventSourceResponse:
    # sse-starlette ends every stream when uvicorn starts shutting down, unless given a grace.
    # The front end ends what is still open once `grace_s` is over: the stream's error event
    # comes first, the cut only after `SHUTDOWN_MARGIN_S`.
    return EventSourceResponse(events, shutdown_grace_period=api.grace_s + SHUTDOWN_MARGIN_S)


async def _events(gen: Choices, piece, include_usage: bool, first: dict | None):
    """The server-sent events of a streamed answer, ending with `[DONE]` (or an error event)."""
    error = False
    try:
        if first is not None:
            yield {"data": json.dumps(first)}
        async for index, delta, new, reason, lps in gen.pieces():
            yield {"data": json.dumps(piece([gen.chunk_choice(index, delta, new, reason, lps)], False))}
        if include_usage:
            yield {"data": json.dumps(piece([], True))}
        yield {"data": "[DONE]"}
    except ApiError as exc:
        error = True
        yield {"data": json.dumps(exc.body())}
        yield {"data": "[DONE]"}
    finally:
        gen.close(error)
