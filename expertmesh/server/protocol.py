"""The OpenAI wire format: request bodies (validated by pydantic), response bodies, error bodies.

Types are strict (`max_tokens: "4"`, `4.0` or `true` is a 400, and so is a prompt of booleans).
OpenAI parameters the server does not implement (`UNSUPPORTED`) are a 400 unless they hold
their neutral value; other unknown fields are ignored, as the OpenAI API does for fields a model
does not use. Extensions (vLLM's names): `stop_token_ids` (generation also stops at these ids),
`repetition_penalty`, `min_tokens`, `ignore_eos`, and, in every choice, `token_ids` (the
generated ids, so that models without a tokenizer are usable). The sampling options' meaning is
`engine/request.py`'s; `n` choices and logprobs in the bodies are `server/choices.py`'s.
"""

from __future__ import annotations

import time
import uuid
from typing import Literal

from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field, field_validator

from expertmesh.engine.request import MAX_BIAS, MAX_LOGIT_BIAS, MAX_LOGPROBS, MAX_PENALTY

MAX_TEMPERATURE = 2.0  # the OpenAI API's range
INT64 = 2**63  # a seed is a signed 64-bit integer
MAX_N = 128  # choices per request (vLLM's bound)
# Parameters not implemented, and the values that ask for nothing (those are accepted).
UNSUPPORTED = {
    "echo": (None, False), "response_format": (None, {"type": "text"}), "tools": (None, []),
    "tool_choice": (None, "none"), "functions": (None, []), "best_of": (None, 1), "suffix": (None, ""),
}


class StreamOptions(BaseModel):
    model_config = ConfigDict(strict=True)

    include_usage: bool = False


class _Generation(BaseModel):
    model_config = ConfigDict(extra="allow", strict=True)

    model: str
    max_tokens: int | None = Field(None, ge=1)
    temperature: float = Field(1.0, ge=0, le=MAX_TEMPERATURE)
    top_p: float = Field(1.0, gt=0, le=1)
    seed: int | None = Field(None, ge=-INT64, lt=INT64)
    stop: str | list[str] | None = None
    stop_token_ids: list[int] = []
    stream: bool = False
    stream_options: StreamOptions | None = None
    n: int = Field(1, ge=1, le=MAX_N)
    presence_penalty: float | None = Field(None, ge=-MAX_PENALTY, le=MAX_PENALTY)
    frequency_penalty: float | None = Field(None, ge=-MAX_PENALTY, le=MAX_PENALTY)
    repetition_penalty: float | None = Field(None, gt=0, lt=float("inf"))
    logit_bias: dict[str, float] | None = None
    min_tokens: int = Field(0, ge=0)
    ignore_eos: bool = False

    @field_validator("logit_bias")
    @classmethod
    def _bias(cls, bias: dict[str, float] | None) -> dict[str, float] | None:
        if bias is None:
            return None
        if len(bias) > MAX_LOGIT_BIAS:
            raise ValueError(f"{len(bias)} entries; at most {MAX_LOGIT_BIAS}")
        for key, value in bias.items():
            if not key.isdigit():
                raise ValueError(f"key {key[:20]!r} is not a token id")
            if not -MAX_BIAS <= value <= MAX_BIAS:
                raise ValueError(f"bias {value} of token {key} is outside [-100, 100]")
        return bias

    def options(self) -> dict:
        """The sampling options as `engine/request.py: Request`'s fields."""
        return {"presence_penalty": self.presence_penalty or 0.0,
                "frequency_penalty": self.frequency_penalty or 0.0,
                "repetition_penalty": self.repetition_penalty if self.repetition_penalty is not None else 1.0,
                "logit_bias": tuple((int(k), v) for k, v in (self.logit_bias or {}).items()),
                "min_tokens": self.min_tokens, "ignore_eos": self.ignore_eos, "logprobs": self.top_k_logprobs}

    @property
    def top_k_logprobs(self) -> int | None:
        """How many most likely tokens come back with each token (None: no logprobs)."""
        return None

    @property
    def stop_strings(self) -> list[str]:
        """The stop strings, empty ones left out (they would match at once)."""
        if self.stop is None:
            return []
        return [s for s in ([self.stop] if isinstance(self.stop, str) else self.stop) if s]

    @property
    def limit(self) -> int | None:
        """The most tokens asked for, if any."""
        return self.max_tokens

    def unsupported(self) -> str | None:
        """The first parameter given that the server does not implement, if any."""
        extra = self.model_extra or {}
        return next((name for name, neutral in UNSUPPORTED.items()
                     if name in extra and not any(_same(extra[name], n) for n in neutral)), None)

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)


class CompletionRequest(_Generation):
    """`prompt`: text, token ids, or a list holding one of those."""

    prompt: str | list[int] | list[str] | list[list[int]]
    logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)

    @property
    def top_k_logprobs(self) -> int | None:
        return self.logprobs

    @field_validator("prompt")
    @classmethod
    def _one_prompt(cls, prompt):
        if isinstance(prompt, list) and prompt and isinstance(prompt[0], (str, list)):
            if len(prompt) != 1:
                raise ValueError(f"{len(prompt)} prompts given; send one prompt per request")
            prompt = prompt[0]
        if not prompt:
            raise ValueError("the prompt is empty")
        return prompt


def _same(value, neutral) -> bool:
    """JSON equality: `true` is not 1 and `false` not 0, `0.0` is 0."""
    if type(value) is bool or type(neutral) is bool:
        return value is neutral
    return value == neutral


class TextPart(BaseModel):
    model_config = ConfigDict(strict=True)

    type: Literal["text"]
    text: str


class Message(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True)

    role: str
    content: str | list[TextPart] | None = None

    def text(self) -> str:
        if isinstance(self.content, list):
            return "".join(p.text for p in self.content)
        return self.content or ""


class ChatRequest(_Generation):
    """`max_completion_tokens`: the current OpenAI name of `max_tokens` (it wins when both are given)."""

    messages: list[Message] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool | None = None
    top_logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)

    @property
    def top_k_logprobs(self) -> int | None:
        if self.top_logprobs and not self.logprobs:
            raise ApiError(400, "top_logprobs needs logprobs: true", param="top_logprobs")
        return (self.top_logprobs or 0) if self.logprobs else None

    @property
    def limit(self) -> int | None:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens


class ApiError(Exception):
    """An answer other than 200: HTTP status, message, the offending field (`param`)."""

    def __init__(self, status: int, message: str, param: str | None = None,
                 kind: str = "invalid_request_error", code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.kind, self.code = status, message, param, kind, code

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.kind, "param": self.param,
                          "code": self.code}}

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status)


def validation_error(errors: list[dict]) -> ApiError:
    """pydantic's first complaint about a body -> a 400 naming the field."""
    first = errors[0]
    if first["type"] == "json_invalid":
        return ApiError(400, f"the body is not valid JSON: {first.get('ctx', {}).get('error', '')}")
    loc = [str(x) for x in first["loc"] if x != "body"]
    field = loc[0] if loc else None
    where = ".".join(loc) or "body"
    return ApiError(400, f"{where}: {first['msg']}", param=field)


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


def usage(prompt_tokens: int, completion_tokens: int, cached_tokens: int = 0) -> dict:
    """OpenAI's usage object; `cached_tokens`: prompt tokens served from the prefix cache."""
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens,
            "prompt_tokens_details": {"cached_tokens": cached_tokens}}


def completion_choice(index: int, text: str, ids: list[int], reason: str | None, logprobs: dict | None) -> dict:
    return {"index": index, "text": text, "logprobs": logprobs, "finish_reason": reason, "token_ids": ids}


def chat_choice(index: int, text: str | None, ids: list[int], reason: str | None, logprobs: dict | None,
                chunk: bool, first: bool = False) -> dict:
    """A choice of a `chat.completion`, or of a chunk (its delta carries `text`; the role on the first)."""
    if not chunk:
        return {"index": index, "message": {"role": "assistant", "content": text}, "logprobs": logprobs,
                "finish_reason": reason, "token_ids": ids}
    delta = {"role": "assistant", "content": text or ""} if first else {"content": text or ""}
    return {"index": index, "delta": delta, "logprobs": logprobs, "finish_reason": reason, "token_ids": ids}


def completion_body(rid: str, model: str, choices: list[dict], usage_: dict | None, chunk: bool) -> dict:
    """A `text_completion` (or one streamed chunk of it: `usage_` only on the last)."""
    body = {"id": rid, "object": "text_completion", "created": int(time.time()), "model": model,
            "choices": choices}
    if usage_ is not None or not chunk:
        body["usage"] = usage_
    return body


def chat_body(rid: str, model: str, choices: list[dict], usage_: dict | None, chunk: bool) -> dict:
    """A `chat.completion`, or a `chat.completion.chunk`."""
    body = {"id": rid, "object": "chat.completion.chunk" if chunk else "chat.completion",
            "created": int(time.time()), "model": model, "choices": choices}
    if usage_ is not None or not chunk:
        body["usage"] = usage_
    return body
