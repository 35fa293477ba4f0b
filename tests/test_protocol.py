"""The OpenAI wire format (server/protocol.py) offline, without a server: what each request body
is accepted as, which bodies are a 400 and what the 400 names, and the shape of the response and
error bodies, as the OpenAI API documents them. `test_server.py` sends the same kinds of bodies
over HTTP; here every edge of every range is checked in milliseconds."""

import pydantic
import pytest

from expertmesh.server.protocol import (UNSUPPORTED, ApiError, ChatRequest, CompletionRequest, Message,
                                        chat_body, chat_choice, completion_body, completion_choice, usage,
                                        validation_error)

INT64_MIN, INT64_MAX = -2**63, 2**63 - 1


def completion(**fields) -> CompletionRequest:
    return CompletionRequest.model_validate({"model": "m", "prompt": "hi", **fields})


def chat(**fields) -> ChatRequest:
    return ChatRequest.model_validate({"model": "m", "messages": [{"role": "user", "content": "hi"}], **fields})


def rejected(make, **fields) -> str:
    """The field that the body's 400 names, as the server reports it (FastAPI puts "body" first)."""
    with pytest.raises(pydantic.ValidationError) as caught:
        make(**fields)
    errors = [{**e, "loc": ("body", *e["loc"])} for e in caught.value.errors()]
    return validation_error(errors).param


@pytest.mark.parametrize("make", [completion, chat])
@pytest.mark.parametrize("name, good, bad", [
    ("max_tokens", [1, 4096], [0, -1]),
    ("temperature", [0, 0.0, 1e-9, 2, 2.0], [-1e-9, 2.0001]),
    ("top_p", [1e-9, 0.5, 1], [0, 1.0001, -1]),
    ("seed", [INT64_MIN, 0, INT64_MAX], [INT64_MIN - 1, INT64_MAX + 1]),
    ("n", [1, 128], [0, 129]),
])
def test_each_range_is_accepted_up_to_its_edge_and_a_400_just_past_it(make, name, good, bad):
    for value in good:
        assert getattr(make(**{name: value}), name) == value
    for value in bad:
        assert rejected(make, **{name: value}) == name


@pytest.mark.parametrize("prompt, want", [
    ("hi", "hi"), ([5, 6], [5, 6]), (["hi"], "hi"), ([[5, 6]], [5, 6]), ([0], [0]),
])
def test_a_prompt_is_text_or_ids_alone_or_in_a_list_of_one(prompt, want):
    assert completion(prompt=prompt).prompt == want


@pytest.mark.parametrize("prompt", ["", [], [""], [[]], ["a", "b"], [[1], [2]], [True], ["a", 1]])
def test_an_empty_prompt_or_several_prompts_are_a_400_on_prompt(prompt):
    assert rejected(completion, prompt=prompt) == "prompt"


def test_a_chat_without_messages_is_a_400_on_messages():
    assert rejected(chat, messages=[]) == "messages"


def test_max_completion_tokens_starts_at_one():
    assert chat(max_completion_tokens=1).limit == 1
    assert rejected(chat, max_completion_tokens=0) == "max_completion_tokens"


@pytest.mark.parametrize("fields, limit", [
    ({}, None), ({"max_tokens": 7}, 7), ({"max_completion_tokens": 5}, 5),
    ({"max_tokens": 7, "max_completion_tokens": 5}, 5),
])
def test_a_chat_limit_is_max_completion_tokens_else_max_tokens(fields, limit):
    assert chat(**fields).limit == limit
    if "max_completion_tokens" not in fields:
        assert completion(**fields).limit == limit


@pytest.mark.parametrize("stop, strings", [
    (None, []), ("", []), ("x", ["x"]), (["", "a", "bc"], ["a", "bc"]), ([], []),
])
def test_stop_strings_leave_out_empty_ones(stop, strings):
    assert completion(stop=stop).stop_strings == strings


@pytest.mark.parametrize("name", sorted(UNSUPPORTED))
def test_an_unimplemented_parameter_is_named_unless_it_asks_for_nothing(name):
    for neutral in UNSUPPORTED[name]:
        assert completion(**{name: neutral}).unsupported() is None
    assert completion(**{name: "something"}).unsupported() == name


def test_json_equality_decides_what_is_neutral():
    # `true` is not 1 nor `false` 0 (a bool asks for something other than the number), but 0.0 is 0
    assert completion(best_of=True).unsupported() == "best_of"
    assert completion(echo=0).unsupported() == "echo"
    assert completion(echo=False, best_of=1.0, suffix="").unsupported() is None
    # the first one, in UNSUPPORTED's order, is named; unknown fields are ignored
    assert completion(tools=[{"type": "function"}], echo=True).unsupported() == "echo"
    assert completion(some_field=3).unsupported() is None


def test_usage_is_included_only_when_asked_for():
    assert not completion().include_usage
    assert not completion(stream_options={}).include_usage
    assert not completion(stream_options={"include_usage": False}).include_usage
    assert completion(stream_options={"include_usage": True}).include_usage


def test_message_text_joins_its_parts_and_is_empty_without_content():
    assert Message(role="user", content="ab").text() == "ab"
    assert Message(role="user", content=[{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]).text() == "ab"
    assert Message(role="assistant").text() == ""
    assert Message(role="user", content=[]).text() == ""


def test_a_400_names_the_first_complaint_and_its_top_level_field():
    error = validation_error([{"type": "int_type", "loc": ("body", "messages", 0, "content"), "msg": "bad"},
                              {"type": "int_type", "loc": ("body", "n"), "msg": "other"}])
    assert (error.status, error.param, error.message) == (400, "messages", "messages.0.content: bad")
    whole = validation_error([{"type": "model_type", "loc": ("body",), "msg": "not an object"}])
    assert (whole.param, whole.message) == (None, "body: not an object")
    broken = validation_error([{"type": "json_invalid", "loc": ("body", 3), "msg": "x",
                                "ctx": {"error": "Expecting value"}}])
    assert (broken.status, broken.param) == (400, None)
    assert broken.message == "the body is not valid JSON: Expecting value"


def test_an_error_is_openais_error_body_with_its_status():
    error = ApiError(429, "busy", kind="rate_limit_error", code="full")
    assert str(error) == "busy"  # what a log line of the exception shows
    assert error.body() == {"error": {"message": "busy", "type": "rate_limit_error", "param": None, "code": "full"}}
    response = error.response()
    assert response.status_code == 429 and response.body == b'{"error":{"message":"busy","type":' \
        b'"rate_limit_error","param":null,"code":"full"}}'
    assert ApiError(400, "x", param="n").body()["error"] == {"message": "x", "type": "invalid_request_error",
                                                            "param": "n", "code": None}


def test_usage_totals_prompt_and_completion_and_says_what_the_prefix_cache_held():
    assert usage(3, 4) == {"prompt_tokens": 3, "completion_tokens": 4, "total_tokens": 7,
                           "prompt_tokens_details": {"cached_tokens": 0}}
    assert usage(3, 4, 2)["prompt_tokens_details"] == {"cached_tokens": 2}


def test_completion_bodies_carry_usage_whole_or_on_the_last_chunk_only():
    ab = completion_choice(0, "ab", [1, 2], "stop", None)
    whole = completion_body("id", "m", [ab], usage(1, 2), chunk=False)
    assert whole["object"] == "text_completion" and whole["usage"] == usage(1, 2)
    assert whole["choices"] == [{"index": 0, "text": "ab", "logprobs": None, "finish_reason": "stop",
                                 "token_ids": [1, 2]}]
    assert "usage" in completion_body("id", "m", [completion_choice(0, "", [], "length", None)], None, chunk=False)
    assert "usage" not in completion_body("id", "m", [completion_choice(0, "a", [1], None, None)], None, chunk=True)
    last = completion_body("id", "m", [completion_choice(1, "", [], "stop", None)], usage(1, 1), chunk=True)
    assert last["usage"] == usage(1, 1) and last["choices"][0]["index"] == 1


def test_chat_chunks_give_the_role_first_then_content_deltas():
    first = chat_body("id", "m", [chat_choice(0, None, [], None, None, chunk=True, first=True)], None, chunk=True)
    assert first["object"] == "chat.completion.chunk" and "usage" not in first
    assert first["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    later = chat_body("id", "m", [chat_choice(0, "b", [2], "stop", None, chunk=True)], usage(1, 1), chunk=True)
    assert later["choices"] == [{"index": 0, "delta": {"content": "b"}, "logprobs": None, "finish_reason": "stop",
                                 "token_ids": [2]}]
    assert later["usage"] == usage(1, 1)
    whole = chat_body("id", "m", [chat_choice(0, "ab", [1, 2], "length", None, chunk=False)], usage(1, 2),
                      chunk=False)
    assert whole["object"] == "chat.completion" and whole["usage"] == usage(1, 2)
    assert whole["choices"] == [{"index": 0, "message": {"role": "assistant", "content": "ab"}, "logprobs": None,
                                 "finish_reason": "length", "token_ids": [1, 2]}]
