"""The OpenAI wire format: request bodies (validated by pydantic), response bodies, error bodies.

Types are strict (`max_tokens: "4"`, `4.0` or `true` is a 400, and so is a prompt of booleans).
OpenAI parameters the server does not implement (`UNSUPPORTED`) are a 400 unless they hold
their neutral value; other unknown fields are ignored, as the OpenAI API does for fields a model
does not use. Extensions (vLLM's names): `stop_token_ids` (generation also stops at these ids)
and, in every choice, `token_ids` (the generated ids, so that models without a tokenizer are
usable).
"""

from __future__ import annotations

import time
import uuid
from typing import Literal

from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field, field_validator

MAX_TEMPERATURE = 2.0  # the OpenAI API's range
INT64 = 2**63  # a seed is a signed 64-bit integer
# Parameters not implemented, and the values that ask for nothing (those are accepted).
UNSUPPORTED = {
    "logprobs": (None, False), "top_logprobs": (None, 0), "echo": (None, False),
    "presence_penalty": (None, 0), "frequency_penalty": (None, 0), "repetition_penalty": (None, 1),
    "logit_bias": (None, {}), "response_format": (None, {"type": "text"}), "tools": (None, []),
    "tool_choice": (None, "none"), "functions": (None, []), "best_of": (None, 1), "suffix": (None, ""),
    "min_tokens": (None, 0), "ignore_eos": (None, False),
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
    n: int = 1

    @field_validator("n")
    @classmethod
    def _one_choice(cls, n: int) -> int:
        if n != 1:
            raise ValueError("only n=1 is supported; send n requests instead")
        return n

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


def completion_body(rid: str, model: str, text: str, ids: list[int], reason: str | None,
                    usage_: dict | None, chunk: bool) -> dict:
    """A `text_completion` (or one streamed chunk of it: `usage_` only on the last)."""
    body = {"id": rid, "object": "text_completion", "created": int(time.time()), "model": model,
            "choices": [{"index": 0, "text": text, "logprobs": None, "finish_reason": reason,
                         "token_ids": ids}]}
    if usage_ is not None or not chunk:
        body["usage"] = usage_
    return body


def chat_body(rid: str, model: str, text: str | None, ids: list[int], reason: str | None,
              usage_: dict | None, chunk: bool, first: bool = False) -> dict:
    """A `chat.completion`, or a `chat.completion.chunk` whose delta carries `text`."""
    if chunk:
        delta = {"role": "assistant", "content": text or ""} if first else {"content": text or ""}
        choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": reason, "token_ids": ids}
        body = {"id": rid, "object": "chat.completion.chunk", "created": int(time.time()),
                "model": model, "choices": [choice]}
        if usage_ is not None:
            body["usage"] = usage_
        return body
    message = {"role": "assistant", "content": text}
    return {"id": rid, "object": "chat.completion", "created": int(time.time()), "model": model,
            "choices": [{"index": 0, "message": message, "logprobs": None, "finish_reason": reason,
                         "token_ids": ids}],
            "usage": usage_}
