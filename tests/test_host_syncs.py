"""An engine decode step waits for the device only where the design needs it, on every deployment.

One whole engine step (`Engine.step`: control, scheduling, `Runner.forward` with its paged batch,
the model, sampling and the finite check, and the outputs' gather) runs on `fake_device`'s
pretend accelerator after a prefill step, every sequence decoding one token, and its logits and
tokens are compared with the same step on the CPU. Counted per rank: reads of device values on
the host (`syncs`), copies from the host to the device (`uploads`), and those of them that wait
for the device on CUDA as a read does (`blocking_uploads`: a copy from pageable memory, or host
indices handed to a device tensor's indexing).

Per engine step and rank, reason by reason in `expected`:
- one read per step on every rank: the finite check's flags, with, on the last pipeline stage,
  every micro-batch's sampled token ids (sampled on the device; the scheduler needs them as
  Python ints, after the step);
- the standard EP exchange reads its split sizes once per MoE layer (`all_to_all_single` takes
  Python ints); the low-latency exchange reads none; without the grouped kernel (any GPU but
  Hopper in bf16) the per-expert loop reads each layer's expert counts;
- the paged batch's layout goes up in one copy per micro-batch, with the first stage's token ids
  (apart from it under two-batch overlap, whose halves each plan their own), and sampling's per-row values (temperature, top-p, top-k, the draw's uniform) in
  one where a micro-batch has a random request; none waits (non-blocking, from pinned memory on CUDA, which this machine
  cannot check).
Everything else stays on the host (the scheduler, the exchange choice's all-reduce over a gloo
group, the control messages) or on the device (pipeline hidden states, TP all-reduces).
"""

import functools
from dataclasses import dataclass, field

import pytest
import torch
import torch.distributed as dist

from expertmesh.config import Workload, Yarn, preset
from expertmesh.deployment import Deployment
from expertmesh.engine import runner
from expertmesh.engine.engine import Engine
from expertmesh.engine.request import Request
from expertmesh.engine.scheduler import EngineConfig
from expertmesh.engine.shard import shard_model
from expertmesh.engine.spec import RunSpec
from expertmesh.launch import launch
from expertmesh.model import moe
from expertmesh.model.synthetic import materialize
from expertmesh.parallel.dispatch import LOW_LATENCY_TOKENS
from expertmesh.parallel.mesh import stage_group
from expertmesh.parallel.pipeline import PipelineLinks
from fake_device import DEVICE, FakeDevice, move_to_device, to_host

CFG = preset("tiny", n_layers=2)
# Qwen3-MoE's features: per-head q/k norms, and a dense MLP as the second layer (no exchange there)
QWEN3 = CFG.with_(expert_kind="swiglu", n_kv_heads=4, qk_head_norm=True, dense_layers=(1,), dense_hidden=512)
# DeepSeek-V3's: latent attention with a low-rank query and YaRN, the group-limited sigmoid
# router, an ungated shared expert, a dense first layer
DEEPSEEK = CFG.with_(expert_kind="swiglu", head_dim=48, kv_lora_rank=64, q_lora_rank=96, qk_rope_head_dim=16,
                     v_head_dim=32, rope_interleave=True, yarn=Yarn(4.0, 64, mscale=0.7, mscale_all_dim=1.0),
                     router_kind="sigmoid_grouped", n_groups=4,
                     topk_groups=2, routed_scaling=2.5, shared_expert_hidden=128, shared_expert_gate=False,
                     dense_layers=(0,), dense_hidden=512)
PROMPT, BATCH, NEW = 6, 8, 3
# Blocks of 4: a decode at position 6 reads 2 blocks, 7 of their 8 slots (the padding mask runs).
ENGINE = EngineConfig(block_size=4, num_blocks=24, max_batched_tokens=64, max_seqs=8, chunked_prefill=False)
# Requests 2 to 5 draw at random, the others are greedy, so that every micro-batch that samples
# holds both kinds, on every deployment: EP deals requests round-robin (0, 2, 4, 6 | 1, 3, 5, 7)
# and pipeline micro-batches are contiguous halves of a rank's requests.
REQUESTS = [Request(i, tuple((7 * i + 5 * j) % CFG.vocab_size for j in range(PROMPT)), NEW,
                    temperature=0.8 if 2 <= i <= 5 else 0.0, top_p=0.9, seed=i) for i in range(BATCH)]


@dataclass(frozen=True)
class Counts:
    syncs: int
    uploads: int
    blocking_uploads: int
    events: list = field(default_factory=list, compare=False, repr=False)  # where each happened


def expected(deployment: str, exchange: str, kernel: str, stage: int, cfg=CFG) -> Counts:
    """What one engine decode step does on a rank of pipeline stage `stage`, reason by reason."""
    dep = Deployment.parse(deployment)
    micro = dep.pp  # the engine's default: one micro-batch per stage
    first, last = stage == 0, stage == dep.pp - 1
    moe_layers = sum(not cfg.is_dense(i) for i in dep.stage_layers(cfg.n_layers)[stage])
    exchange, _, overlap = exchange.partition("+")
    standard_ep = dep.ep > 1 and exchange == "standard"
    halves = 2 if overlap == "tbo" else 1  # two-batch overlap: two forwards through the layers
    syncs = {
        "the step's finite flags, with every micro-batch's sampled token ids on the last stage, "
        "in one copy": 1,
        "standard EP exchange: its split sizes, once per MoE layer and micro-batch (each half of "
        "one under two-batch overlap)": moe_layers * micro * halves if standard_ep else 0,
        "per-expert loop (no grouped kernel): each MoE layer's expert counts, once per "
        "micro-batch, unless the standard exchange has them on the host already":
            moe_layers * micro * halves if kernel == "loop" and not standard_ep else 0,
    }
    blocking = {}  # each one would wait for the device on CUDA, as a read does: none needed
    uploads = {
        **blocking,
        "paged batch layout, one copy per micro-batch (per half under two-batch overlap), with the "
        "first stage's token ids": micro * halves,
        "token ids of the first stage under two-batch overlap (each half plans apart), one "
        "non-blocking copy per micro-batch": micro if first and halves == 2 else 0,
        "sampling's per-row values (every micro-batch here has a random request)": micro if last else 0,
    }
    return Counts(sum(syncs.values()), sum(uploads.values()), sum(blocking.values()))


def _engine(spec: RunSpec, rank: int, group, on_device: bool) -> Engine:
    dep = spec.deployment
    model = materialize(shard_model(spec, rank, group), seed=3, dtype=torch.float32)
    device = torch.device("cpu")
    if on_device:
        model, device = move_to_device(model), DEVICE
    links = PipelineLinks(dep, rank, device) if dep.pp > 1 else None
    return Engine(model, spec.cfg, dep, ENGINE, rank, links, n_micro=spec.micro_batches, overlap=spec.overlap)


def _serve(spec: RunSpec, rank: int, group, mode: FakeDevice | None):
    """Prefill step, decode step, stop. Returns the decode step's (counts, logits this rank
    computed, tokens rank 0 got)."""
    eng = _engine(spec, rank, group, mode is not None)
    logits = []
    head = eng.runner.model.lm_head
    hook = head.register_forward_hook(lambda m, a, out: logits.append(to_host(out).clone())) if head else None
    if rank == 0:
        for r in REQUESTS:
            eng.add_request(r)
    eng.step()
    logits.clear()
    before = mode.counts() if mode else (0, 0, 0)
    seen = len(mode.events) if mode else 0
    outputs = eng.step()
    after = mode.counts() if mode else (0, 0, 0)
    events = mode.events[seen:] if mode else []
    if rank == 0:
        eng.shutdown()
    else:
        eng.step()
    if hook:
        hook.remove()
    counts = Counts(*(a - b for a, b in zip(after, before)), events)
    return counts, logits, sorted((o.request_id, o.token) for o in outputs)


def _spec(deployment: str, exchange: str, overflow: str | None = None, cfg=CFG) -> RunSpec:
    """overflow: with capacity (factor 1, that policy), which never bites a decode step."""
    exchange, _, overlap = exchange.partition("+")
    cfg = cfg.with_(capacity_factor=1.0, overflow=overflow) if overflow else cfg
    return RunSpec(cfg, Deployment.parse(deployment), Workload(), overlap=overlap or "auto",
                   low_latency_tokens=0 if exchange == "standard" else LOW_LATENCY_TOKENS)


def _rank(deployment: str, exchange: str, kernel: str, overflow: str | None, cfg, device) -> list:
    """Per rank: (stage, counts of the decode step on the pretend device, logits rows compared,
    max |Δlogit| against the same step on the CPU, rank 0's tokens on both)."""
    spec = _spec(deployment, exchange, overflow, cfg)
    rank = dist.get_rank() if dist.is_initialized() else 0
    group = stage_group(spec.deployment, rank) if dist.is_initialized() else None
    _, want, want_tokens = _serve(spec, rank, group, None)
    applies = moe._grouped_mm_applies
    if kernel == "grouped":  # the pretend device is a Hopper GPU in bf16 (else: another GPU)
        moe._grouped_mm_applies = lambda x, hidden: True
    try:
        with FakeDevice() as mode:
            counts, got, tokens = _serve(spec, rank, group, mode)
    finally:  # `single` runs in the test's own process
        moe._grouped_mm_applies = applies
    assert len(got) == len(want)
    diff = max([(g - w).abs().max().item() for g, w in zip(got, want)] + [0.0])
    mine = (spec.deployment.coords(rank)[0], counts, sum(len(w) for w in want), diff, (tokens, want_tokens))
    if not dist.is_initialized():
        return [mine]
    everyone = [None] * dist.get_world_size()
    dist.all_gather_object(everyone, mine)
    return everyone


@pytest.mark.parametrize("deployment, exchange, kernel, overflow", [
    ("single", "-", "grouped", None), ("single", "-", "loop", None),
    ("ep2", "standard", "grouped", None), ("ep2", "low-latency", "grouped", None),
    ("ep2", "low-latency", "loop", None),
    ("ep2", "standard+tbo", "grouped", None), ("ep2", "low-latency+tbo", "grouped", None),
    ("tp2", "-", "grouped", None), ("pp2", "-", "grouped", None),
    ("ep2pp2", "standard", "grouped", None), ("ep2pp2", "low-latency", "grouped", None),
    ("tp2pp2", "-", "grouped", None),
    # capacity adds nothing: a decode step cannot exceed it, and its counts stay on the device
    ("single", "-", "grouped", "drop"), ("ep2", "low-latency", "grouped", "reroute"),
    ("tp2", "-", "grouped", "drop")])
def test_an_engine_decode_step_waits_for_the_device_only_where_the_design_needs(deployment, exchange, kernel,
                                                                                 overflow):
    """Counts per rank as `expected` states them, and the step's logits and tokens are the CPU's."""
    _check_step(deployment, exchange, kernel, overflow, CFG)


@pytest.mark.parametrize("deployment, exchange, kernel", [
    ("single", "-", "loop"), ("ep2", "standard", "grouped"), ("tp2", "-", "grouped"), ("pp2", "-", "loop")])
@pytest.mark.parametrize("cfg", [QWEN3, DEEPSEEK], ids=["qwen3_moe", "deepseek_v3"])
def test_family_features_add_no_wait(deployment, exchange, kernel, cfg):
    """A dense layer reads nothing (no routing, no exchange); per-head norms, latent attention and
    the group-limited router stay on the device."""
    _check_step(deployment, exchange, kernel, None, cfg)


def _check_step(deployment: str, exchange: str, kernel: str, overflow: str | None, cfg) -> None:
    dep = Deployment.parse(deployment)
    run = functools.partial(_rank, deployment, exchange, kernel, overflow, cfg)
    ranks = run(torch.device("cpu")) if dep.world_size == 1 else launch(run, dep.world_size, timeout=120)
    for rank, (stage, counts, rows, diff, (tokens, want_tokens)) in enumerate(ranks):
        want = expected(deployment, exchange, kernel, stage, cfg)
        assert counts == want, f"rank {rank}: {counts}, expected {want}; where:\n" + "\n".join(counts.events)
        last = stage == dep.pp - 1
        assert rows == (BATCH // dep.dp if last else 0), f"rank {rank}: logits of every sequence it samples"
        assert diff < 1e-5, f"rank {rank}: the pretend device's logits differ from the CPU's by {diff}"
        assert tokens == want_tokens and len(tokens) == (BATCH if rank == 0 else 0)


@pytest.mark.parametrize("extra, more", [
    (lambda t: float(t.sum()), (1, 0, 0)),
    (lambda t: torch.tensor([0], device=t.device), (0, 1, 1)),
    (lambda t: torch.zeros(1).to(t.device, non_blocking=True), (0, 1, 0)),
], ids=["read", "blocking-upload", "non-blocking-upload"])
def test_one_more_wait_in_a_decode_step_changes_its_count(monkeypatch, extra, more):
    """The count itself: one more read, or copy up, at sampling is one more in the step."""
    start = runner.sample_requests

    def start_and_extra(logits, *args):
        extra(logits)
        return start(logits, *args)

    monkeypatch.setattr(runner, "sample_requests", start_and_extra)
    monkeypatch.setattr(moe, "_grouped_mm_applies", lambda x, hidden: True)
    with FakeDevice() as mode:
        counts, _, _ = _serve(_spec("single", "-"), 0, None, mode)
    want = expected("single", "-", "grouped", 0)
    assert (counts.syncs - want.syncs, counts.uploads - want.uploads,
            counts.blocking_uploads - want.blocking_uploads) == more
