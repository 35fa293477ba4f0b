"""Multi-head latent attention's two forms (`model/mla.py`): a forward whose sequences have no
cached position (a fresh prefill) expands the latent to per-head keys and values; a decode step,
a prompt chunk after the first and any other forward over cached positions attend to the latent
with the absorbed query. Both against transformers' greedy tokens on a DeepSeek-V3 checkpoint,
through the serving engine with chunked prefill, and which form each forward took."""

import random

import pytest
import torch

transformers = pytest.importorskip("transformers", reason="the reference is transformers' DeepSeek-V3")

from expertmesh.checkpoint import config_from_hf, load_checkpoint  # noqa: E402
from expertmesh.checkpoint.tiny import reference_greedy, save_tiny_checkpoint  # noqa: E402
from expertmesh.deployment import Deployment  # noqa: E402
from expertmesh.engine.engine import Engine  # noqa: E402
from expertmesh.engine.request import Request  # noqa: E402
from expertmesh.engine.scheduler import EngineConfig  # noqa: E402
from expertmesh.engine.serve import serve  # noqa: E402
from expertmesh.model.transformer import build_model  # noqa: E402


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return save_tiny_checkpoint("deepseek_v3", tmp_path_factory.mktemp("deepseek_v3"))


@pytest.fixture(scope="module")
def model(checkpoint):
    torch.set_num_threads(1)
    model = build_model(config_from_hf(checkpoint))
    load_checkpoint(model, checkpoint, torch.float32)
    return model


class Expansions:
    """Counts the forwards that expanded the latent: the expanded form calls each layer's kv_b
    projection as a module; the absorbed form only reads its weight."""

    def __init__(self, model):
        self.calls = 0
        self.hook = model.layers["0"].attn.kv_b.register_forward_hook(self._count)

    def _count(self, module, args, out):
        self.calls += 1


def test_chunked_prefill_and_decode_in_shared_steps_give_transformers_tokens(model, checkpoint):
    """12 requests with prompts of 1 .. 40 tokens over a 24-token step budget (long prompts come
    in several chunks) arriving over 6 steps, so that steps mix first chunks, later chunks and
    decodes: each request's tokens are transformers' greedy tokens of its prompt alone."""
    rng = random.Random(3)
    requests = [Request(i, tuple(rng.randrange(1, 128) for _ in range(n)), rng.randint(2, 8))
                for i, n in enumerate([1, 40, 7, 33, 2, 18, 25, 5, 40, 11, 29, 3])]
    engine = Engine(model, model.cfg, Deployment(), EngineConfig(
        num_blocks=64, block_size=4, max_batched_tokens=24, chunked_prefill=True), eos=())
    expansions = Expansions(model)
    out = serve(engine, [(i // 2, r) for i, r in enumerate(requests)])
    expansions.hook.remove()
    assert expansions.calls >= 1  # the first step holds only new sequences
    for r in requests:
        want, _ = reference_greedy(checkpoint, torch.tensor([r.prompt]), r.max_tokens)
        assert out.tokens[r.id] == want[0].tolist(), f"prompt of {len(r.prompt)}"


def test_a_prompt_forward_expands_and_decode_steps_absorb(model, checkpoint):
    """Two prompts arriving together: one forward over both (expanded), then 5 decode steps (absorbed)."""
    prompts = torch.tensor([[1, 5, 9, 13, 17], [2, 30, 4, 77, 8]])
    expansions = Expansions(model)
    engine = Engine(model, model.cfg, Deployment(), EngineConfig(num_blocks=16, block_size=4), eos=())
    out = serve(engine, [(0, Request(i, tuple(p.tolist()), 6)) for i, p in enumerate(prompts)])
    expansions.hook.remove()
    assert expansions.calls == 1
    want, _ = reference_greedy(checkpoint, prompts, 6)
    assert [out.tokens[i] for i in range(2)] == want.tolist()


def test_requests_that_find_a_cached_latent_prefix_get_transformers_tokens(model, checkpoint):
    """Prefix caching over DeepSeek-V3's latent pool: requests repeating a 17-token prefix arrive
    after it was computed, take its 4 full blocks from the cache (the latent, not K and V), attend
    absorbed over them, and get transformers' greedy tokens of their whole prompt."""
    prefix = tuple(range(3, 20))
    requests = [Request(i, prefix + (40 + i, 50 + i), 4) for i in range(3)]
    engine = Engine(model, model.cfg, Deployment(), EngineConfig(num_blocks=64, block_size=4), eos=())
    out = serve(engine, [(2 * i, r) for i, r in enumerate(requests)])
    assert engine.scheduler.cached_tokens >= 2 * 16  # the 2 later requests each found 4 blocks
    for r in requests:
        want, _ = reference_greedy(checkpoint, torch.tensor([r.prompt]), r.max_tokens)
        assert out.tokens[r.id] == want[0].tolist()
