"""The sampling parameters of OpenAI's API (and vLLM's extensions) through a live `expertmesh
serve`, driven by the official `openai` client, held to transformers: logprobs are the
log-softmax of transformers' logits of the same sequence; penalties, logit bias and min_tokens
are transformers' own logits processors (repetition penalty, sequence bias, min new tokens) plus
OpenAI's presence / frequency formula, applied in vLLM's order to transformers' logits, greedy.
`n` choices are indexed, seeded per choice, and count the prompt once.

One server (ep2, a tiny random Qwen2-MoE checkpoint with a word-level tokenizer), reused by every
test; the last stops it.
"""

import json
import signal

import pytest
import torch

from test_server import HI, Server, checkpoint, hf_model, tokenizer  # noqa: F401 (fixtures)

httpx = pytest.importorskip("httpx")
transformers = pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def server(checkpoint, tmp_path_factory):  # noqa: F811
    s = Server(tmp_path_factory.mktemp("logs"), "--model", str(checkpoint), "--deployment", "ep2",
               "--num-blocks", "96", "--block-size", "8", "--max-seqs", "16", "--timeout", "120")
    yield s
    s.proc.send_signal(signal.SIGTERM)  # a clean stop: every rank and API server exits before `stop` counts
    assert s.proc.wait(120) == 0, s.output()
    s.stop()


def hf_logits(hf_model, ids: list[int]) -> torch.Tensor:  # noqa: F811
    with torch.no_grad():
        return hf_model(torch.tensor([ids])).logits[0, -1].double()


def hf_greedy(hf_model, prompt: list[int], n: int, presence=0.0, frequency=0.0, repetition=1.0,  # noqa: F811
              bias=None, min_tokens=0, stop=()) -> list[int]:
    """transformers' processors in vLLM's order (bias, min tokens, repetition), then OpenAI's
    presence / frequency penalties, greedy."""
    from transformers.generation.logits_process import (MinNewTokensLengthLogitsProcessor,
                                                        RepetitionPenaltyLogitsProcessor,
                                                        SequenceBiasLogitsProcessor)
    processors = [MinNewTokensLengthLogitsProcessor(len(prompt), min_tokens, list(stop) or [0])]
    if bias:
        processors.insert(0, SequenceBiasLogitsProcessor({(t,): float(b) for t, b in bias.items()}))
    if repetition != 1:
        processors.append(RepetitionPenaltyLogitsProcessor(repetition))
    ids = list(prompt)
    for _ in range(n):
        scores = hf_logits(hf_model, ids).float()[None]
        for p in processors:
            scores = p(torch.tensor([ids]), scores)
        out = ids[len(prompt):]
        counts = torch.bincount(torch.tensor(out, dtype=torch.long), minlength=scores.shape[-1]).float()
        scores = scores[0] - frequency * counts - presence * (counts > 0).float()
        token = int(scores.argmax())
        ids.append(token)
        if token in stop:
            break
    return ids[len(prompt):]


PROMPT = [5, 17, 99, 3, 64, 2, 5, 17]


def test_completion_logprobs_are_transformers_log_softmax_streamed_and_not(server, hf_model):  # noqa: F811
    r = server.client.completions.create(model="tinyqwen", prompt=PROMPT, max_tokens=5, temperature=0, logprobs=3)
    choice = r.choices[0]
    lp = choice.logprobs
    ids = list(PROMPT)
    assert len(lp.token_logprobs) == len(choice.token_ids) == 5
    for i, token in enumerate(choice.token_ids):
        want = hf_logits(hf_model, ids).log_softmax(-1)
        assert lp.token_logprobs[i] == pytest.approx(float(want[token]), abs=1e-4)
        top = want.topk(3)
        got = lp.top_logprobs[i]
        assert len(got) in (3, 4) and f"w{token}" in got  # the drawn token and the 3 most likely
        for value, t in zip(top.values.tolist(), top.indices.tolist()):
            assert got[f"w{t}"] == pytest.approx(value, abs=1e-4)
        assert lp.tokens[i] == f"w{token}"
        ids.append(token)
    assert lp.text_offset == [sum(len(t) for t in lp.tokens[:i]) for i in range(5)]
    chunks = list(server.client.completions.create(model="tinyqwen", prompt=PROMPT, max_tokens=5, temperature=0,
                                                   logprobs=3, stream=True))
    assert [v for c in chunks for v in c.choices[0].logprobs.token_logprobs] == lp.token_logprobs
    assert [o for c in chunks for o in c.choices[0].logprobs.text_offset] == lp.text_offset


def test_chat_logprobs_and_top_logprobs_streamed_and_not(server, hf_model, tokenizer):  # noqa: F811
    ids = list(tokenizer.apply_chat_template(HI, add_generation_prompt=True, return_dict=True)["input_ids"])
    r = server.client.chat.completions.create(model="tinyqwen", messages=HI, max_tokens=4, temperature=0,
                                              logprobs=True, top_logprobs=2)
    content = r.choices[0].logprobs.content
    assert len(content) == 4
    for entry, token in zip(content, r.choices[0].token_ids):
        want = hf_logits(hf_model, ids).log_softmax(-1)
        assert entry.token == tokenizer.decode([token]) and entry.bytes == list(entry.token.encode())
        assert entry.logprob == pytest.approx(float(want[token]), abs=1e-4)
        assert [t.logprob for t in entry.top_logprobs] == pytest.approx(want.topk(2).values.tolist(), abs=1e-4)
        ids.append(token)
    stream = server.client.chat.completions.create(model="tinyqwen", messages=HI, max_tokens=4, temperature=0,
                                                   logprobs=True, top_logprobs=2, stream=True)
    streamed = [e for c in stream if c.choices and c.choices[0].logprobs for e in c.choices[0].logprobs.content]
    assert [e.logprob for e in streamed] == [e.logprob for e in content]
    plain = server.client.chat.completions.create(model="tinyqwen", messages=HI, max_tokens=2, temperature=0)
    assert plain.choices[0].logprobs is None


@pytest.mark.parametrize("options", [
    {"repetition_penalty": 1.6},
    {"presence_penalty": 1.5, "frequency_penalty": 0.8},
    {"presence_penalty": -1.0, "frequency_penalty": -2.0, "repetition_penalty": 0.7},
    {"logit_bias": {"3": 5.0, "17": -100}},
    {"min_tokens": 4, "stop_token_ids": "first two"},
], ids=["repetition", "presence+frequency", "negative", "logit_bias", "min_tokens"])
def test_penalties_bias_and_min_tokens_are_transformers_processors(server, hf_model, options):  # noqa: F811
    plain = hf_greedy(hf_model, PROMPT, 8)
    if options.get("stop_token_ids") == "first two":
        options = {**options, "stop_token_ids": plain[:2]}
    want = hf_greedy(hf_model, PROMPT, 8, options.get("presence_penalty", 0.0), options.get("frequency_penalty", 0.0),
                     options.get("repetition_penalty", 1.0),
                     {int(k): v for k, v in options.get("logit_bias", {}).items()}, options.get("min_tokens", 0),
                     tuple(options.get("stop_token_ids", ())))
    assert want != plain  # the option changes the answer
    body = dict(options)
    bias = body.pop("logit_bias", None)
    r = server.client.completions.create(model="tinyqwen", prompt=PROMPT, max_tokens=8, temperature=0,
                                         logit_bias=bias, extra_body=body)
    assert r.choices[0].token_ids == want


def test_n_choices_are_indexed_seeded_per_choice_and_count_the_prompt_once(server):
    ask = dict(model="tinyqwen", prompt=PROMPT, max_tokens=6, temperature=1.0, seed=1234)
    whole = server.client.completions.create(n=4, **ask)
    assert [c.index for c in whole.choices] == [0, 1, 2, 3]
    one = server.client.completions.create(**ask)
    assert whole.choices[0].token_ids == one.choices[0].token_ids  # choice 0 keeps the seed
    assert len({tuple(c.token_ids) for c in whole.choices}) > 1  # the others draw their own
    assert whole.usage.prompt_tokens == len(PROMPT)
    assert whole.usage.completion_tokens == sum(len(c.token_ids) for c in whole.choices)
    chunks = list(server.client.completions.create(n=4, stream=True, stream_options={"include_usage": True}, **ask))
    streamed = {i: [t for c in chunks for ch in c.choices if ch.index == i for t in ch.token_ids] for i in range(4)}
    assert streamed == {c.index: c.token_ids for c in whole.choices}
    assert chunks[-1].usage.completion_tokens == whole.usage.completion_tokens
    chat = server.client.chat.completions.create(model="tinyqwen", messages=HI, max_tokens=3, temperature=1.0,
                                                 seed=7, n=3)
    assert [c.index for c in chat.choices] == [0, 1, 2] and chat.usage.completion_tokens == 9


def test_the_other_choices_take_choice_0s_prompt_from_the_prefix_cache(server):
    """n > 1 shares the prompt's KV: choices 1.. start once choice 0's prompt blocks are cached,
    so each finds 3 full blocks (24 tokens) there instead of computing them (submitted together,
    they found none: every choice prefilled in the same step)."""
    prompt = [(7 * i + 3) % 120 for i in range(25)]  # 3 full blocks of 8, and a token more

    def hits() -> float:
        return sum(server.metric("expertmesh_prefix_cache_hits_total", dp_rank=str(r)) for r in range(2))
    before = hits()
    r = server.client.completions.create(model="tinyqwen", prompt=prompt, max_tokens=3, temperature=1.0,
                                         seed=5, n=4)
    assert [len(c.token_ids) for c in r.choices] == [3] * 4 and r.usage.prompt_tokens == 25
    assert hits() - before >= 3 * 24


BAD = [
    ("/completions", {"logprobs": 21}, "logprobs"),
    ("/completions", {"presence_penalty": 2.5}, "presence_penalty"),
    ("/completions", {"frequency_penalty": -3}, "frequency_penalty"),
    ("/completions", {"repetition_penalty": 0}, "repetition_penalty"),
    ("/completions", {"logit_bias": {"5": 101}}, "logit_bias"),
    ("/completions", {"logit_bias": {"5000": 1}}, "logit_bias"),
    ("/completions", {"logit_bias": {"w": 1}}, "logit_bias"),
    ("/completions", {"logit_bias": {str(i): 1 for i in range(301)}}, "logit_bias"),
    ("/completions", {"min_tokens": 9, "max_tokens": 8}, "min_tokens"),
    ("/completions", {"n": 129}, "n"),
    ("/completions", {"n": 0}, "n"),
    ("/completions", {"ignore_eos": 1}, "ignore_eos"),
    ("/completions", {"echo": True}, "echo"),
    ("/chat/completions", {"top_logprobs": 2}, "top_logprobs"),
    ("/chat/completions", {"logprobs": True, "top_logprobs": 21}, "top_logprobs"),
    ("/chat/completions", {"logprobs": 2}, "logprobs"),
    ("/chat/completions", {"response_format": {"type": "json_object"}}, "response_format"),
    ("/chat/completions", {"tools": [{"type": "function", "function": {"name": "f"}}]}, "tools"),
]


@pytest.mark.parametrize("path, extra, param", BAD)
def test_an_option_out_of_range_is_a_400_naming_it(server, path, extra, param):
    body = {"model": "tinyqwen", **({"prompt": [1, 2]} if path == "/completions" else {"messages": HI}), **extra}
    r = httpx.post(server.url + "/v1" + path, content=json.dumps(body), timeout=60,
                   headers={"content-type": "application/json"})
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == param and r.json()["error"]["type"] == "invalid_request_error"
