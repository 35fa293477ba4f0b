"""The serving engine on one device (engine/engine.py, scheduler.py): a mixed stream of requests
gives, for every request, the tokens of the single-device model generating it alone without a
cache, with and without chunked prefill, with a pool small enough to force preemption; bad
requests are rejected alone; seeded sampling does not depend on the rest of the batch."""

import pytest
import torch

from expertmesh.deployment import Deployment
from expertmesh.engine.engine import Engine
from expertmesh.engine.request import Request
from expertmesh.engine.scheduler import EngineConfig
from expertmesh.engine.serve import serve
from serving import Mixed, naive_tokens


@pytest.fixture(scope="module")
def model():
    from expertmesh.config import preset
    from expertmesh.model.transformer import reference_model
    from conftest import SMALL
    torch.set_num_threads(1)
    return reference_model(preset("tiny", **{**SMALL, "max_seq_len": 512}), seed=5)


@pytest.fixture(scope="module")
def mixed(model):
    return Mixed(model, n=44, max_prompt=300, max_new=12, spread=30, n_aborts=4, seed=1)


def make_engine(model, **kw) -> Engine:
    return Engine(model, model.cfg, Deployment(), EngineConfig(**kw), eos=())


@pytest.mark.parametrize("kw", [
    dict(num_blocks=256, block_size=16, max_batched_tokens=128, chunked_prefill=True),
    dict(num_blocks=256, block_size=8, max_batched_tokens=512, chunked_prefill=False),
    dict(num_blocks=40, block_size=8, max_batched_tokens=96, max_seqs=12, chunked_prefill=True),
], ids=["chunked", "whole-prompts", "small-pool-preempts"])
def test_mixed_workload_equals_each_request_generated_alone(model, mixed, kw):
    engine = Engine(model, model.cfg, Deployment(), EngineConfig(**kw), eos=(mixed.eos,))
    out = serve(engine, mixed.arrivals, mixed.aborts)
    mixed.check(out, kw["num_blocks"])
    if kw["num_blocks"] == 40:
        assert engine.scheduler.preemptions > 0


def test_bad_requests_are_rejected_alone_and_the_others_are_served(model):
    engine = make_engine(model, num_blocks=8, block_size=8)
    good = Request("ok", (1, 2, 3), max_tokens=3)
    cases = {
        "vocab": (Request("vocab", (1, 999), max_tokens=2), "outside the vocabulary"),
        "long": (Request("long", (1,) * 500, max_tokens=20), "exceeds the maximum length"),
        "pool": (Request("pool", (1,) * 70, max_tokens=2), "KV blocks but the pool has 8"),
    }
    arrivals = [(0, r) for r, _ in cases.values()] + [(0, good)]
    out = serve(engine, arrivals)
    for rid, (_, message) in cases.items():
        assert message in out.rejected[rid]
    assert out.tokens["ok"] == naive_tokens(model, good.prompt, 3)
    for kw, message in [(dict(prompt=()), "prompt is empty"), (dict(max_tokens=0), "max_tokens"),
                        (dict(temperature=-1.0), "temperature"), (dict(top_p=0.0), "top_p")]:
        with pytest.raises(ValueError, match=message):
            Request("bad", **{"prompt": (1,), **kw})
    engine = make_engine(model, num_blocks=8)
    engine.add_request(good)
    with pytest.raises(ValueError, match="already in flight"):
        engine.add_request(good)


def test_seeded_sampling_gives_a_request_the_same_tokens_whatever_else_is_batched(model):
    target = Request("t", (5, 6, 7, 8), max_tokens=8, temperature=1.0, top_p=0.9, seed=42)
    alone = serve(make_engine(model, num_blocks=64, block_size=4), [(0, target)])
    crowd = [(s % 3, Request(f"o{s}", tuple(range(1, 2 + s * 7)), max_tokens=6, temperature=0.7, seed=s))
             for s in range(6)]
    busy = serve(make_engine(model, num_blocks=64, block_size=4, max_batched_tokens=16),
                 crowd + [(2, target)])
    assert alone.tokens["t"] == busy.tokens["t"]
    reseeded = Request("t", (5, 6, 7, 8), 8, temperature=1.0, top_p=0.9, seed=43)
    other_seed = serve(make_engine(model, num_blocks=64, block_size=4), [(0, reseeded)])
    assert other_seed.tokens["t"] != alone.tokens["t"]


def test_an_aborted_request_frees_its_blocks_at_once(model):
    engine = make_engine(model, num_blocks=16, block_size=4)
    engine.add_request(Request("a", tuple(range(1, 30)), max_tokens=10))
    engine.step()
    assert engine.stats()[0].blocks_used == 8
    engine.abort("a")
    assert engine.step() == []
    assert engine.stats()[0].blocks_used == 0 and not engine.has_work


def test_the_pool_is_sized_from_the_memory_budget_on_the_rank_with_most_kv_per_block():
    from expertmesh.config import preset
    from expertmesh.engine.engine import pool_blocks

    from expertmesh.model.transformer import build_model

    cfg = preset("tiny")  # 4 layers, 8 KV heads x 32, fp32
    per_layer_block = 2 * 16 * 8 * 32 * 4  # k and v of 16 tokens
    pools = build_model(cfg).make_pools(num_blocks=3, block_size=16)  # on the meta device
    assert all(p.v is not p.k and p.nbytes == 3 * per_layer_block for p in pools.values())
    budget = EngineConfig(block_size=16, kv_cache_gb=1.0)
    assert pool_blocks(cfg, Deployment(), budget) == 2**30 // (4 * per_layer_block)
    assert pool_blocks(cfg, Deployment(ep=4), budget) == 2**30 // (4 * per_layer_block)
    assert pool_blocks(cfg, Deployment(tp=2), budget) == 2**30 // (4 * per_layer_block // 2)
    assert pool_blocks(cfg, Deployment(pp=3), budget) == 2**30 // (2 * per_layer_block)  # 2+1+1 layers
    assert pool_blocks(cfg, Deployment(), EngineConfig(num_blocks=7)) == 7
    with pytest.raises(ValueError, match="holds no KV block"):
        pool_blocks(cfg, Deployment(), EngineConfig(kv_cache_gb=1e-9))


def test_eos_ids_come_from_generation_config_else_config(tmp_path):
    import json

    from expertmesh.checkpoint.hf_config import eos_ids

    assert eos_ids(tmp_path) == ()
    (tmp_path / "config.json").write_text(json.dumps({"eos_token_id": 2}))
    assert eos_ids(tmp_path) == (2,)
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": [2, 32000]}))
    assert eos_ids(tmp_path) == (2, 32000)


def test_an_aborted_id_can_be_reused_at_once(model):
    engine = make_engine(model, num_blocks=16, block_size=4)
    engine.add_request(Request("a", (1, 2, 3), max_tokens=5))
    engine.step()
    engine.abort("a")
    engine.add_request(Request("a", (4, 5), max_tokens=2))
    tokens = [o.token for o in engine.step() + engine.step()]
    assert tokens == naive_tokens(model, (4, 5), 2) and not engine.has_work


def test_decode_steps_within_their_blocks_send_up_their_token_ids_alone(model, monkeypatch):
    """Once every sequence decodes, a step that adds no block continues the last one
    (`PagedBatch`'s `previous`): of its plan only the S token ids cross to the device, and the
    tokens are still the model's own."""
    from expertmesh.model import paged

    sent = []
    real = paged.upload
    monkeypatch.setattr(paged, "upload", lambda host, device: sent.append(sum(t.numel() for t in host))
                        or real(host, device))
    prompts = [(3, 1, 4, 1, 5), (9, 2, 6, 5, 3, 5, 8, 9, 7), (3, 2)]
    engine = Engine(model, model.cfg, Deployment(), EngineConfig(block_size=16, num_blocks=16, max_seqs=4),
                    graphs="off")
    for i, prompt in enumerate(prompts):
        engine.add_request(Request(i, prompt, 6))
    tokens, per_step = {i: [] for i in range(len(prompts))}, []
    while engine.has_work:
        sent.clear()
        for out in engine.step():
            tokens[out.request_id].append(out.token)
        per_step.append(list(sent))
    engine.shutdown()
    for i, prompt in enumerate(prompts):
        assert tokens[i] == naive_tokens(model, prompt, 6), i
    # the prefill, the first decode (built in full: its layout follows a prefill), then four
    # continuing decodes within the first block of each sequence
    assert len(per_step) == 6 and per_step[2:] == [[3]] * 4, per_step
