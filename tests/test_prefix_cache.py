"""Prefix caching changes no token (engine/scheduler.py with engine/block_pool.py): a stream of
requests sharing prefixes, greedy and seeded-sampled, with aborts, chunked prefill, preemption and
evictions, gives every request the tokens it gets with caching off, on every deployment; every
pool ends free; and the cache was used."""

import functools

import pytest
import torch

from expertmesh.config import Workload, preset
from expertmesh.deployment import Deployment
from expertmesh.engine.engine import Engine
from expertmesh.engine.request import Request
from expertmesh.engine.scheduler import EngineConfig
from expertmesh.engine.serve import serve
from expertmesh.engine.spec import RunSpec
from expertmesh.engine.worker import replay_rank
from expertmesh.launch import launch
from expertmesh.model.transformer import reference_model
from serving import naive_tokens

SEED = 11
# a small pool (preempts and evicts), chunks of 40 tokens
ENGINE = EngineConfig(num_blocks=20, block_size=8, max_batched_tokens=40, max_seqs=6)


def shared_prefix_stream(vocab: int, seed: int = 5):
    """24 requests over 16 steps: 3 prefixes (17, 40 and 64 tokens) with suffixes of 0 .. 9 tokens
    (0: a prompt repeated whole); odd ones sampled (temperature 0.9, their own seed); 2 aborted."""
    g = torch.Generator().manual_seed(seed)
    prefixes = [tuple(torch.randint(vocab, (n,), generator=g).tolist()) for n in (17, 40, 64)]
    arrivals = []
    for i in range(24):
        suffix = tuple(torch.randint(vocab, (i % 10,), generator=g).tolist())
        prompt = (prefixes[i % 3] + suffix) or prefixes[0]
        sampled = dict(temperature=0.9, seed=100 + i) if i % 2 else {}
        arrivals.append((i * 2 // 3, Request(i, prompt, max_tokens=2 + i % 5, **sampled)))
    aborts = [(6, 4), (9, 13)]
    return arrivals, aborts


def serve_with(deployment: str, engine: EngineConfig, arrivals, aborts):
    dep = Deployment.parse(deployment)
    spec = RunSpec(preset("tiny"), dep, Workload(), seed=SEED)
    spec.validate(dep.world_size)
    fn = functools.partial(replay_rank, spec, engine, arrivals, aborts, eos=())
    if dep.world_size == 1:
        return fn(torch.device("cpu"))
    return launch(fn, dep.world_size, timeout=300)


@pytest.fixture(scope="module")
def stream():
    torch.set_num_threads(1)
    arrivals, aborts = shared_prefix_stream(preset("tiny").vocab_size)
    off = serve_with("single", EngineConfig(**{**ENGINE.__dict__, "prefix_caching": False}), arrivals, aborts)
    assert not any(s.cached_tokens for s in off.rank_stats)
    return arrivals, aborts, off


@pytest.mark.parametrize("deployment, blocks", [("single", 20), ("ep2", 12), ("tp2", 20), ("pp2", 20),
                                                ("ep2pp2", 12)])  # each of 2 DP ranks has half the work
def test_caching_changes_no_token_greedy_or_sampled_on_any_deployment(deployment, blocks, stream):
    arrivals, aborts, off = stream
    engine = EngineConfig(**{**ENGINE.__dict__, "num_blocks": blocks})
    on = serve_with(deployment, engine, arrivals, aborts)
    aborted = {rid for _, rid in aborts}
    for _, r in arrivals:
        if r.id in aborted:
            n = min(len(on.tokens[r.id]), len(off.tokens[r.id]))
            assert on.tokens[r.id][:n] == off.tokens[r.id][:n], f"request {r.id} (aborted)"
        else:
            assert on.tokens[r.id] == off.tokens[r.id], f"request {r.id}"
            assert on.finished[r.id] == off.finished[r.id]
    for s in on.rank_stats:
        assert s.blocks_free == blocks and s.running == s.waiting == 0
    # the cache was used, the pool was small enough to preempt and evict, and the prompt tokens
    # computed are those not found cached
    assert sum(s.cached_tokens for s in on.rank_stats) > 200
    assert sum(s.preemptions for s in on.rank_stats) > 0 and sum(s.blocks_evicted for s in on.rank_stats) > 0
    off_computed = off.rank_stats[0].prompt_computed
    assert max(s.prompt_computed for s in on.rank_stats) < off_computed


def test_a_request_whose_prefix_was_evicted_meanwhile_gets_the_reference_tokens():
    """a caches its prompt; b, unrelated and long, evicts the tail of that chain while c, which
    shares a's prefix, waits; c finds what is left and computes the rest. Checked against the
    model generating c alone with no cache."""
    torch.set_num_threads(1)
    cfg = preset("tiny")
    model = reference_model(cfg, seed=SEED)
    g = torch.Generator().manual_seed(3)
    prefix = tuple(torch.randint(cfg.vocab_size, (48,), generator=g).tolist())
    other = tuple(torch.randint(cfg.vocab_size, (70,), generator=g).tolist())
    a, b = Request("a", prefix + (1, 2), max_tokens=2), Request("b", other, max_tokens=3)
    c = Request("c", prefix + (7,), max_tokens=4)
    engine = Engine(model, cfg, Deployment.parse("single"),
                    EngineConfig(num_blocks=12, block_size=8, max_batched_tokens=128, max_seqs=1))
    out = serve(engine, [(0, a), (3, b), (4, c)])
    stats = engine.scheduler.stats()
    assert stats.blocks_evicted > 0 and 0 < engine.scheduler.cached_tokens < 48  # c: part of its prefix
    assert out.tokens["c"] == naive_tokens(model, c.prompt, 4)
    assert out.tokens["a"] == naive_tokens(model, a.prompt, 2) and out.tokens["b"] == naive_tokens(model, b.prompt, 3)
    assert stats.blocks_free == 12
