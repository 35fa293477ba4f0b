"""The serving engine on every deployment (local gloo ranks): a mixed stream of requests with
staggered arrivals, aborts, EOS and stop tokens gives every request the tokens of the
single-device model generating it alone without a cache; every rank's KV pool ends empty.

Under epN each EP rank schedules its own requests and every rank runs one forward per step
(some with no token); under tpN and ppN the ranks of a scheduler's group agree on every batch.
"""

import functools

import pytest
import torch
import torch.distributed as dist

from expertmesh.config import Workload, preset
from expertmesh.deployment import Deployment
from expertmesh.engine.engine import Engine
from expertmesh.engine.request import Request
from expertmesh.engine.scheduler import EngineConfig
from expertmesh.engine.serve import serve
from expertmesh.engine.shard import load_rank
from expertmesh.engine.spec import RunSpec
from expertmesh.engine.worker import replay_rank
from expertmesh.launch import launch
from expertmesh.model.transformer import reference_model
from expertmesh.parallel.expert import dispatchers
from serving import Mixed, naive_tokens

SEED = 11


@pytest.fixture(scope="module")
def model():
    torch.set_num_threads(1)
    return reference_model(preset("tiny"), seed=SEED)


@pytest.fixture(scope="module")
def mixed(model):
    return Mixed(model, n=40, max_prompt=200, max_new=8, spread=12, n_aborts=3, seed=2)


@pytest.fixture(scope="module")
def small(model):
    """For 16 ranks on two cores: fewer, shorter requests, still arriving over the run."""
    return Mixed(model, n=20, max_prompt=120, max_new=6, spread=8, n_aborts=2, seed=3)


def serve_on(deployment: str, work: Mixed, engine: EngineConfig, n_micro: int | None = None,
             overlap: str = "auto", **exchange):
    """exchange: RunSpec's a2a and gpus_per_node."""
    dep = Deployment.parse(deployment)
    spec = RunSpec(preset("tiny"), dep, Workload(), seed=SEED, n_micro=n_micro, overlap=overlap, **exchange)
    spec.validate(dep.world_size)
    fn = functools.partial(replay_rank, spec, engine, work.arrivals, work.aborts, eos=(work.eos,))
    if dep.world_size == 1:
        return fn(torch.device("cpu"))
    return launch(fn, dep.world_size, timeout=300)


CHUNKED = EngineConfig(num_blocks=160, block_size=16, max_batched_tokens=96, max_seqs=16)
PREEMPTING = EngineConfig(num_blocks=28, block_size=8, max_batched_tokens=128, max_seqs=8)
WHOLE = EngineConfig(num_blocks=160, block_size=16, max_batched_tokens=256, chunked_prefill=False)


@pytest.mark.parametrize("deployment", ["single", "ep4", "tp2", "pp2", "ep2pp2"])
@pytest.mark.parametrize("engine", [CHUNKED, PREEMPTING, WHOLE], ids=["chunked", "preempting", "whole"])
def test_deployment_serves_each_request_its_reference_tokens(deployment, engine, mixed):
    out = serve_on(deployment, mixed, engine)
    mixed.check(out, engine.num_blocks)
    if engine is PREEMPTING:
        assert sum(s.preemptions for s in out.rank_stats) > 0


@pytest.mark.parametrize("deployment", ["ep16", "tp8pp2"])
def test_sixteen_rank_deployments_serve_each_request_its_reference_tokens(deployment, small):
    engine = EngineConfig(num_blocks=20, block_size=8, max_batched_tokens=64, max_seqs=4)
    small.check(serve_on(deployment, small, engine), engine.num_blocks)


@pytest.mark.parametrize("deployment, n_micro", [("pp2", 3), ("ep2pp2", 2)])
def test_pipeline_micro_batches_within_a_step_change_no_token(deployment, n_micro, mixed):
    mixed.check(serve_on(deployment, mixed, PREEMPTING, n_micro), PREEMPTING.num_blocks)


@pytest.mark.parametrize("threshold", [0, 16, 10_000], ids=["never", "decode", "always"])
def test_the_exchange_chosen_per_step_changes_no_token(threshold):
    """Under ep2 the engine agrees once per forward on every rank's token count and runs the
    low-latency exchange when it is at most --low-latency-tokens: here prefill of 48-token prompts
    takes the standard exchange and decode the low-latency one (threshold 16); tokens are the
    single-device reference's, whichever exchange ran."""
    from expertmesh.engine.worker import run

    workload = Workload(batch_size=4, prompt_len=48, gen_len=6, seed=5)
    reference = run(RunSpec(preset("tiny"), Deployment(), workload, seed=SEED))
    spec = RunSpec(preset("tiny"), Deployment.parse("ep2"), workload, seed=SEED, low_latency_tokens=threshold)
    result = run(spec, timeout=300)
    assert torch.equal(result.tokens, reference.tokens)
    calls = result.exchange["low_latency_calls"]
    layer_calls = 2 * preset("tiny").n_layers  # per forward: every layer on both ranks
    forwards = workload.gen_len  # prefill + gen_len - 1 decodes, each one forward
    expected = {0: 0, 16: (forwards - 1) * layer_calls, 10_000: forwards * layer_calls}[threshold]
    assert calls == expected


def _plan_agreements(spec: RunSpec, engine: EngineConfig, arrivals: list, device) -> list:
    """Serve `arrivals` on this rank; every rank's (all-reduces its exchange choice made, steps,
    low-latency layer calls), and rank 0's tokens."""
    model, links, _ = load_rank(spec, device)
    eng = Engine(model, spec.cfg, spec.deployment, engine, dist.get_rank(), links, n_micro=spec.micro_batches)
    out = serve(eng, arrivals)
    low_latency = sum(d.stats.low_latency_calls for d in dispatchers(model).values())
    everyone = [None] * dist.get_world_size()
    dist.all_gather_object(everyone, (eng.runner.exchange.all_reduces, eng.runner.steps, low_latency))
    return [everyone, out.tokens if out else None]


@pytest.mark.parametrize("deployment", ["ep2", "ep2pp2"])
def test_decode_steps_plan_the_exchange_from_the_step_message_without_an_all_reduce(deployment, model):
    """Rank 0 sends, with each step that only decodes, the most sequences any data-parallel rank
    runs in it, so the EP ranks plan it without agreeing: an all-reduce per micro-batch only in
    the 2 steps that take new requests (whose prompts fit one step), and every forward on the
    low-latency exchange still. Tokens are the reference's."""
    prompts = {i: tuple((5 * i + 3 * j) % 97 + 1 for j in range(5 + i)) for i in range(5)}
    arrivals = [(0, Request(i, prompts[i], 6)) for i in range(4)] + [(3, Request(4, prompts[4], 3))]
    spec = RunSpec(preset("tiny"), Deployment.parse(deployment), Workload(), seed=SEED)
    ranks, tokens = launch(functools.partial(_plan_agreements, spec, WHOLE, arrivals),
                           spec.deployment.world_size, timeout=300)
    steps = ranks[0][1]
    assert steps == 6  # step 0: four prompts; 1-5: their decodes, beside the late prompt at 3
    micro = spec.micro_batches  # a plan per micro-batch (ep2pp2: 2 per step)
    for all_reduces, rank_steps, low_latency in ranks:
        assert (all_reduces, rank_steps) == (2 * micro, steps)
        assert low_latency == steps * micro * preset("tiny").n_layers // spec.deployment.pp  # prompts too: < 64
    assert tokens == {i: naive_tokens(model, prompts[i], 6 if i < 4 else 3) for i in range(5)}


@pytest.mark.parametrize("deployment", ["ep2", "ep4", "ep2pp2"])
@pytest.mark.parametrize("engine", [CHUNKED, PREEMPTING], ids=["chunked", "preempting"])
def test_two_batch_overlap_serves_each_request_its_reference_tokens(deployment, engine, mixed):
    """--overlap tbo: every forward runs as two micro-batches taking turns (one of them empty
    when a rank has one sequence), through chunked prefill, decode and preemption."""
    mixed.check(serve_on(deployment, mixed, engine, overlap="tbo"), engine.num_blocks)


def test_two_batch_overlap_over_the_hierarchical_exchange_serves_each_request_its_reference_tokens(small):
    """ep4 as 2 nodes of 2: each half's tokens cross a node once, to a relay, while the other half
    computes (the relay's own exchanges are synchronous; the flat one inside the node yields)."""
    small.check(serve_on("ep4", small, CHUNKED, overlap="tbo", a2a="hierarchical", gpus_per_node=2),
                CHUNKED.num_blocks)


def test_two_batch_overlap_equals_its_halves_run_one_after_the_other_bit_for_bit(monkeypatch):
    """Taking turns changes only when each half's work runs, not what it computes: the logits of
    every step equal those of the same two micro-batches run one after the other. Both give the
    reference's tokens."""
    from expertmesh.engine import runner
    from expertmesh.engine.worker import run_rank
    from expertmesh.model.steps import run_steps

    workload = Workload(batch_size=8, prompt_len=40, gen_len=5, seed=4)
    reference = run_rank(RunSpec(preset("tiny"), Deployment(), workload, seed=SEED), torch.device("cpu"))
    spec = RunSpec(preset("tiny"), Deployment.parse("ep2"), workload, seed=SEED, overlap="tbo",
                   record_logits=True, low_latency_tokens=8)  # decode halves take the low-latency path
    turns = launch(functools.partial(run_rank, spec), 2, timeout=300)
    monkeypatch.setattr(runner, "take_turns", lambda all_steps: [run_steps(s) for s in all_steps])
    in_order = launch(functools.partial(run_rank, spec), 2, timeout=300)  # forked: sees the patch
    assert torch.equal(turns.tokens, reference.tokens)
    assert torch.equal(turns.logits, in_order.logits)
    assert turns.exchange["low_latency_calls"] == (workload.gen_len - 1) * 2 * 2 * preset("tiny").n_layers
