"""One run of a plan on one rank, and the result rank 0 assembles from all ranks.

A plan (`RunSpec`) is a ModelConfig + Deployment + Workload + seed. Each rank builds the model on
the meta device, applies the deployment's parallelism to it, materializes only its own shard,
warms up, and serves the workload's batch through the engine (`engine/engine.py`: one arrival of
B requests); rank 0 gets the tokens as they come and every rank's statistics at the end.
"""

from __future__ import annotations

import dataclasses
from collections import Counter
from dataclasses import dataclass

import torch
import torch.distributed as dist

from expertmesh.config import ModelConfig, Workload
from expertmesh.deployment import Deployment
from expertmesh.checkpoint.hf_config import eos_ids
from expertmesh.checkpoint.loader import check_checkpoint, load_checkpoint
from expertmesh.engine.engine import Engine
from expertmesh.engine.load import load_summary
from expertmesh.engine.metrics import Metrics
from expertmesh.engine.request import Request
from expertmesh.engine.scheduler import EngineConfig
from expertmesh.engine.serve import Transcript, serve
from expertmesh.model.synthetic import materialize
from expertmesh.model.transformer import MoETransformer, build_model, parameter_bytes
from expertmesh.parallel.dispatch import LOW_LATENCY_TOKENS, ExchangeStats
from expertmesh.parallel.expert import OVERLAPS, apply_expert_parallel, dispatchers
from expertmesh.parallel.placement import default_placement, validate_placement
from expertmesh.parallel.mesh import stage_group
from expertmesh.parallel.pipeline import PipelineLinks, apply_pipeline
from expertmesh.parallel.tensor import apply_tensor_parallel
from expertmesh.topology import Topology
from expertmesh.trace import start_tracing, take_spans

WARMUP_PROMPT, WARMUP_GEN = 8, 2


@dataclass(frozen=True)
class RunSpec:
    """Everything a rank needs to run its part of a plan.

    n_micro: pipeline micro-batches (None: one per stage). low_latency_tokens: a forward whose
    every EP rank has at most this many tokens uses the low-latency exchange (0: never).
    a2a: "flat" or "hierarchical" token exchange; a2a_chunks: None picks per layer call.
    overlap: "auto", "tbo", "chunks" or "none" (`parallel/expert.py`; none waits on every exchange).
    gpus_per_node: node size of the topology (None: LOCAL_WORLD_SIZE, or one node).
    placement: experts per EP rank per layer (None: contiguous). record_routing: count which
    experts each rank's tokens choose. trace: record spans for a Perfetto trace.
    checkpoint: a Hugging Face model directory whose weights each rank reads its shard of
    (`cfg` from `expertmesh.checkpoint.config_from_hf`), instead of synthetic weights.
    """

    cfg: ModelConfig
    deployment: Deployment
    workload: Workload
    seed: int = 0
    n_micro: int | None = None
    record_logits: bool = False
    warmup: bool = True
    a2a: str = "flat"
    a2a_chunks: int | None = None
    overlap: str = "auto"
    low_latency_tokens: int = LOW_LATENCY_TOKENS
    gpus_per_node: int | None = None
    placement: list | None = None
    record_routing: bool = False
    trace: bool = False
    checkpoint: str | None = None

    def validate(self, world_size: int | None = None) -> None:
        """All checks that can fail, before any rank starts."""
        self.deployment.validate(self.cfg, world_size)
        self.workload.validate_for(self.cfg)
        if self.n_micro is not None and self.n_micro < 1:
            raise ValueError(f"micro-batches {self.n_micro} must be at least 1")
        if self.overlap not in OVERLAPS:
            raise ValueError(f"unknown overlap {self.overlap!r}; use one of {', '.join(OVERLAPS)}")
        if self.a2a not in ("flat", "hierarchical"):
            raise ValueError(f"unknown exchange {self.a2a!r}; use flat or hierarchical")
        if self.low_latency_tokens < 0:
            raise ValueError(f"--low-latency-tokens {self.low_latency_tokens} must be >= 0 (0: never)")
        if self.a2a_chunks is not None and self.a2a_chunks < 1:
            raise ValueError(f"--a2a-chunks {self.a2a_chunks} must be at least 1 (or auto)")
        topology = self.topology
        if self.a2a == "hierarchical" and self.deployment.ep % topology.gpus_per_node and topology.nodes > 1:
            raise ValueError(f"hierarchical exchange needs --gpus-per-node {topology.gpus_per_node} "
                             f"to divide ep={self.deployment.ep}")
        for flag, given in (("--a2a hierarchical", self.a2a == "hierarchical"),
                            ("--placement", self.placement is not None),
                            ("--record-routing", self.record_routing)):
            refuse_off_ep(flag, given, self.deployment)
        if self.placement is not None:
            validate_placement(self.placement, self.cfg.n_layers, self.cfg.n_experts, self.deployment.ep)
        if self.checkpoint:  # else each rank finds a bad tensor only when it loads it
            check_checkpoint(self.cfg, self.checkpoint)

    @property
    def topology(self) -> Topology:
        return Topology.detect(self.deployment.world_size, self.gpus_per_node)

    @property
    def micro_batches(self) -> int:
        return self.n_micro or self.deployment.pp


def refuse_off_ep(flag: str, given: bool, deployment: Deployment) -> None:
    """An option that acts on the token exchange, given for a deployment without one, would be
    silently ignored: an error instead."""
    if given and deployment.ep == 1:
        raise ValueError(f"{flag} acts on expert-parallel deployments only and {deployment.name} "
                         f"has no EP axis; drop it or use epN")


@dataclass
class RunResult:
    """The whole run as rank 0 sees it. tokens `[B, gen_len]`; logits `[B, gen_len, V]` if recorded."""

    deployment: str
    world_size: int
    tokens: torch.Tensor
    metrics: Metrics
    param_bytes: list[int]
    kv_cache_bytes: list[int]
    logits: torch.Tensor | None = None
    exchange: dict | None = None
    routing: list | None = None
    load: dict | None = None
    overflow: dict | None = None
    spans: dict[int, list] | None = None
    checkpoint_bytes: list[int] | None = None

    def to_dict(self) -> dict:
        return {
            "deployment": self.deployment, "world_size": self.world_size,
            "metrics": self.metrics.to_dict(), "param_bytes_per_rank": self.param_bytes,
            "kv_cache_bytes_per_rank": self.kv_cache_bytes, "exchange": self.exchange,
            "load": self.load, "overflow": self.overflow,
            "tokens": self.tokens.tolist(),
        }


def shard_model(spec: RunSpec, rank: int, group: dist.ProcessGroup | None) -> MoETransformer:
    """This rank's shard of the model, still on the meta device."""
    dep = spec.deployment
    model = build_model(spec.cfg)
    stage, inner = dep.coords(rank)
    if dep.pp > 1:
        apply_pipeline(model, dep, stage)
    if dep.tp > 1:
        apply_tensor_parallel(model, group, dep.tp, inner)
    if dep.ep > 1:
        topology = spec.topology
        placements = _placements(spec)
        peer_nodes = [topology.node_of(stage * dep.inner + i) for i in range(dep.ep)]
        apply_expert_parallel(model, group, inner, placements, chunks=spec.a2a_chunks,
                              overlap=spec.overlap != "none", peer_nodes=peer_nodes,
                              hierarchical=spec.a2a == "hierarchical",
                              low_latency_threshold=spec.low_latency_tokens)
    return model


def load_rank(spec: RunSpec, device: torch.device) -> tuple[MoETransformer, PipelineLinks | None, int]:
    """This rank's shard of the model with its weights, its pipeline links, and the checkpoint
    bytes it read."""
    rank = dist.get_rank() if dist.is_initialized() else 0
    dep = spec.deployment
    group = stage_group(dep, rank) if dist.is_initialized() else None
    model = shard_model(spec, rank, group)
    if spec.checkpoint:
        checkpoint_bytes = load_checkpoint(model, spec.checkpoint, spec.cfg.torch_dtype, device)
    else:
        model, checkpoint_bytes = materialize(model, spec.seed, spec.cfg.torch_dtype, device), 0
    links = PipelineLinks(dep, rank, device) if dep.pp > 1 else None
    return model, links, checkpoint_bytes


def serve_rank(spec: RunSpec, engine: EngineConfig, arrivals: list, aborts: list = (),
               device: torch.device = torch.device("cpu"), eos: tuple[int, ...] | None = None,
               clock: str = "step", record_logits: bool = False) -> Transcript | None:
    """Serve `arrivals` / `aborts` (see `engine/serve.py`) with `spec`'s model and deployment, as
    this rank of the default process group; rank 0 returns the transcript. `eos`: the
    checkpoint's EOS ids when None."""
    if eos is None:
        eos = eos_ids(spec.checkpoint) if spec.checkpoint else ()
    model, links, _ = load_rank(spec, device)
    rank = dist.get_rank() if dist.is_initialized() else 0
    eng = Engine(model, spec.cfg, spec.deployment, engine, rank, links, eos, record_logits,
                 spec.micro_batches, spec.overlap)
    return serve(eng, arrivals, aborts, clock)


def static_requests(workload: Workload, cfg: ModelConfig, gen_len: int | None = None) -> list[Request]:
    """The static batch as requests: sequence i's prompt, `gen_len` tokens (no stop token), and
    a sampling seed of its own derived from the workload's."""
    return [Request(i, prompt, gen_len or workload.gen_len, temperature=workload.temperature,
                    top_p=workload.top_p, seed=workload.seed * 1_000_003 + i)
            for i, prompt in enumerate(workload.prompt_lists(cfg))]


def static_engine(requests: list[Request], deployment: Deployment) -> EngineConfig:
    """A pool and budget in which each data-parallel rank prefills its share of the batch in one
    step and decodes it to the end (the assignment rule deals equal requests round-robin)."""
    share = -(-len(requests) // deployment.dp)
    longest = max(len(r.prompt) + r.max_tokens for r in requests)
    block = 16
    return EngineConfig(block_size=block, num_blocks=share * -(-longest // block),
                        max_batched_tokens=share * longest, max_seqs=share, chunked_prefill=False)


def run_rank(spec: RunSpec, device: torch.device, on_step=None) -> RunResult | None:
    """Run `spec` as this rank of the default process group: the static batch is one arrival of
    B requests at the serving engine. Rank 0 returns the result."""
    rank = dist.get_rank() if dist.is_initialized() else 0
    dep, w = spec.deployment, spec.workload
    model, links, checkpoint_bytes = load_rank(spec, device)

    def engine(requests: list[Request], record_logits: bool = False) -> Engine:
        return Engine(model, spec.cfg, dep, static_engine(requests, dep), rank, links,
                      record_logits=record_logits, n_micro=spec.micro_batches, overlap=spec.overlap)

    if spec.warmup:
        warm = dataclasses.replace(w, prompt_ids=None, prompt_len=min(WARMUP_PROMPT, w.prompt_len))
        requests = static_requests(warm, spec.cfg, min(WARMUP_GEN, w.gen_len))
        serve(engine(requests), [(0, r) for r in requests])
    exchange = dispatchers(model)
    for d in exchange.values():  # count the measured run only
        d.stats = ExchangeStats()
        d.routing = Counter() if spec.record_routing else None
    for layer in model.layers.values():
        layer.moe.overflow = dict.fromkeys(layer.moe.overflow, 0)
    if dist.is_initialized():
        dist.barrier()
    if spec.trace:
        start_tracing()
    requests = static_requests(w, spec.cfg)
    measured = engine(requests, spec.record_logits)
    progress = (lambda t: on_step(t.steps - 1)) if on_step is not None and rank == 0 else None
    transcript = serve(measured, [(0, r) for r in requests], on_step=progress)
    payload = {
        "rank": rank, "kv_cache_bytes": measured.runner.kv_cache_bytes,
        "param_bytes": parameter_bytes(model, spec.cfg.torch_dtype), "checkpoint_bytes": checkpoint_bytes,
        "exchange": {layer: d.stats for layer, d in exchange.items()},
        "overflow": {int(name): layer.moe.overflow for name, layer in model.layers.items()},
        "routing": {layer: d.routing for layer, d in exchange.items()} if spec.record_routing else None,
        "spans": take_spans() if spec.trace else None,
    }
    if not dist.is_initialized():
        return assemble(spec, transcript, [payload])
    gathered = [None] * dist.get_world_size() if rank == 0 else None
    dist.gather_object(payload, gathered, dst=0)
    return assemble(spec, transcript, gathered) if rank == 0 else None


def assemble(spec: RunSpec, transcript: Transcript, payloads: list[dict]) -> RunResult:
    """The batch's tokens `[B, gen_len]` (and logits) from the engine's transcript, its metrics
    from the step times (every sequence gets token i at step i), and the ranks' statistics."""
    w = spec.workload
    B, G = w.batch_size, w.gen_len
    if transcript.rejected:
        raise ValueError(next(iter(transcript.rejected.values())))
    if any(len(transcript.tokens[i]) != G for i in range(B)):
        raise RuntimeError("some sequences did not produce every token")
    tokens = torch.tensor([transcript.tokens[i] for i in range(B)], dtype=torch.long)
    logits = None
    if spec.record_logits:
        logits = torch.stack([torch.stack(transcript.logits[i]) for i in range(B)])
    step_times = transcript.token_times[0]
    return RunResult(
        deployment=spec.deployment.name, world_size=spec.deployment.world_size, tokens=tokens,
        metrics=Metrics.from_events(0.0, step_times, B, w.prompt_len),
        param_bytes=[p["param_bytes"] for p in payloads],
        kv_cache_bytes=[p["kv_cache_bytes"] for p in payloads], logits=logits,
        exchange=_exchange_summary(spec, payloads), routing=_routing_stats(spec, payloads),
        load=_load(spec, payloads), overflow=_overflow(spec, payloads),
        spans={p["rank"]: p["spans"] for p in payloads} if spec.trace else None,
        checkpoint_bytes=[p["checkpoint_bytes"] for p in payloads] if spec.checkpoint else None,
    )


def _exchange_summary(spec: RunSpec, payloads: list[dict]) -> dict | None:
    """Rows and bytes the EP exchange moved, summed over ranks, per layer and per step."""
    if spec.deployment.ep == 1:
        return None
    per_layer: dict[int, ExchangeStats] = {}
    for p in payloads:
        for layer, stats in p["exchange"].items():
            total = per_layer.setdefault(layer, ExchangeStats())
            total.rows_sent += stats.rows_sent
            total.low_latency_calls += stats.low_latency_calls
            total.cross_node_rows += stats.cross_node_rows
            total.cross_node_bytes += stats.cross_node_bytes
    steps = spec.workload.gen_len
    cross = sum(s.cross_node_bytes for s in per_layer.values())
    return {
        "a2a": spec.a2a, "nodes": spec.topology.nodes, "gpus_per_node": spec.topology.gpus_per_node,
        "rows_sent": sum(s.rows_sent for s in per_layer.values()),
        "low_latency_calls": sum(s.low_latency_calls for s in per_layer.values()),
        "cross_node_bytes": cross, "cross_node_bytes_per_step": cross / steps,
        "cross_node_bytes_per_layer": {layer: s.cross_node_bytes for layer, s in sorted(per_layer.items())},
    }


def _placements(spec: RunSpec) -> list:
    return spec.placement or default_placement(spec.cfg.n_layers, spec.cfg.n_experts, spec.deployment.ep)


def _load(spec: RunSpec, payloads: list[dict]) -> dict | None:
    if spec.deployment.ep == 1:
        return None
    per_layer: dict[int, dict[int, list]] = {}
    for p in payloads:
        ep_rank = spec.deployment.coords(p["rank"])[1]
        for layer, stats in p["exchange"].items():
            per_layer.setdefault(layer, {})[ep_rank] = stats.loads
    return load_summary(per_layer, _placements(spec), spec.cfg.n_experts)


def _overflow(spec: RunSpec, payloads: list[dict]) -> dict | None:
    """Assignments rerouted or dropped by capacity, over the run (each token counted once:
    TP ranks all see every token, so only the first of each TP group reports)."""
    if spec.cfg.capacity is None:
        return None
    total = {"assignments": 0, "rerouted": 0, "dropped": 0}
    for p in payloads:
        if spec.deployment.tp > 1 and spec.deployment.coords(p["rank"])[1] != 0:
            continue
        for counts in p["overflow"].values():
            for key in total:
                total[key] += counts[key]
    return total


def _routing_stats(spec: RunSpec, payloads: list[dict]) -> list | None:
    """[layer]{source EP rank: Counter(expert tuple -> tokens)} over the measured run."""
    if not spec.record_routing or spec.deployment.ep == 1:
        return None
    layers: list[dict] = [{} for _ in range(spec.cfg.n_layers)]
    for p in payloads:
        ep_rank = spec.deployment.coords(p["rank"])[1]
        for layer, counter in p["routing"].items():
            layers[layer].setdefault(ep_rank, Counter()).update(counter)
    return layers

