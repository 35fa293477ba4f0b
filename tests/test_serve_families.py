"""`expertmesh serve --model DIR` on the families users serve with wide expert parallelism: a tiny
random Qwen3-MoE and a tiny random DeepSeek-V3 (latent attention, group-limited sigmoid routing
with a correction bias) checkpoint written here with a word-level tokenizer and a chat template,
each served single and under one parallel deployment (Qwen3-MoE ep2, DeepSeek-V3 tp2: MLA's heads
split). A chat completion through the official `openai` client must decode to transformers'
greedy generation on the same checkpoint and the rendered template.
"""

import pytest
import torch

openai = pytest.importorskip("openai", reason="the server is driven by the openai client (pip install -e '.[test,serve]')")
pytest.importorskip("fastapi", reason="expertmesh serve needs the serve extra (pip install -e '.[serve]')")
transformers = pytest.importorskip("transformers", reason="the checkpoints and the reference are transformers'")

from expertmesh.checkpoint.tiny import reference_greedy, save_tiny_checkpoint  # noqa: E402
from test_server import Server  # noqa: E402

MESSAGES = [{"role": "system", "content": "w1 w2"}, {"role": "user", "content": "w40 w41 w42 w7"}]
MAX_TOKENS = 8


@pytest.fixture(scope="module", params=["qwen3_moe", "deepseek_v3"])
def family(request, tmp_path_factory):
    """(checkpoint path, the reference's chat answer text, the prompt's token count)."""
    path = save_tiny_checkpoint(request.param, tmp_path_factory.mktemp(request.param) / request.param,
                                tokenizer=True)
    tokenizer = transformers.AutoTokenizer.from_pretrained(path)
    ids = tokenizer.apply_chat_template(MESSAGES, add_generation_prompt=True, return_dict=True)["input_ids"]
    tokens, _ = reference_greedy(path, torch.tensor([list(ids)]), MAX_TOKENS)
    return path, tokenizer.decode(tokens[0].tolist(), skip_special_tokens=True), len(ids)


@pytest.mark.parametrize("parallel", [False, True], ids=["single", "parallel"])
def test_chat_completion_is_transformers_greedy(family, parallel, tmp_path):
    path, want, prompt_tokens = family
    deployment = {"qwen3_moe": "ep2", "deepseek_v3": "tp2"}[path.name] if parallel else "single"
    server = Server(tmp_path, "--model", str(path), "--deployment", deployment, "--num-blocks", "32",
                    "--block-size", "8", "--timeout", "120")
    try:
        r = server.client.chat.completions.create(model=path.name, messages=MESSAGES,
                                                  max_tokens=MAX_TOKENS, temperature=0)
        assert r.choices[0].message.content == want
        assert r.choices[0].finish_reason == "length"
        assert (r.usage.prompt_tokens, r.usage.completion_tokens) == (prompt_tokens, MAX_TOKENS)
    finally:
        server.stop()
