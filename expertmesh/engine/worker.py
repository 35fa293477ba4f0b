"""One run of a plan on one rank: the static batch served through the engine, and the gather of
every rank's report to rank 0.

Each rank builds its shard of the model (`engine/shard.py`), warms up, and serves the workload's
batch through the engine (`engine/engine.py`: one arrival of B requests); rank 0 gets the tokens
as they come and every rank's report at the end, and assembles the `RunResult`
(`engine/result.py`). `run` does all of it for a plan on this machine's local ranks.
"""

from __future__ import annotations

import dataclasses
import functools

import torch
import torch.distributed as dist

from expertmesh.checkpoint.hf_config import eos_ids
from expertmesh.config import ModelConfig, Workload
from expertmesh.deployment import Deployment
from expertmesh.engine import counters
from expertmesh.engine.engine import Engine
from expertmesh.engine.request import Request
from expertmesh.engine.result import RankReport, RunResult, assemble
from expertmesh.engine.sampling import static_seed
from expertmesh.engine.scheduler import EngineConfig
from expertmesh.engine.serve import Transcript, serve
from expertmesh.engine.shard import load_rank
from expertmesh.engine.spec import RunSpec
from expertmesh.launch import launch
from expertmesh.model.transformer import parameter_bytes
from expertmesh.parallel.eplb import Eplb, move_group
from expertmesh.trace import start_tracing, take_spans

WARMUP_PROMPT, WARMUP_GEN = 8, 2


def replay_rank(spec: RunSpec, engine: EngineConfig, arrivals: list, aborts: list = (),
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
                 spec.micro_batches, spec.overlap, spec.graphs, eplb_controller(spec, model, rank))
    return serve(eng, arrivals, aborts, clock)


def eplb_controller(spec: RunSpec, model, rank: int) -> Eplb | None:
    """This rank's online EPLB controller when `spec` asks for one (collective: it makes the
    move groups)."""
    if spec.eplb is None:
        return None
    per = spec.cfg.n_experts // spec.deployment.ep
    return Eplb(model, spec.eplb, per, move_group(spec.deployment, rank))


def static_requests(workload: Workload, cfg: ModelConfig, gen_len: int | None = None) -> list[Request]:
    """The static batch as requests: sequence i's prompt, `gen_len` tokens (no stop token), and
    a sampling seed of its own derived from the workload's."""
    return [Request(i, prompt, gen_len or workload.gen_len, temperature=workload.temperature,
                    top_p=workload.top_p, seed=static_seed(workload.seed, i))
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

    def engine(requests: list[Request], record_logits: bool = False, eplb: Eplb | None = None) -> Engine:
        return Engine(model, spec.cfg, dep, static_engine(requests, dep), rank, links,
                      record_logits=record_logits, n_micro=spec.micro_batches, overlap=spec.overlap,
                      graphs=spec.graphs, eplb=eplb)

    if spec.warmup:
        warm = dataclasses.replace(w, prompt_ids=None, prompt_len=min(WARMUP_PROMPT, w.prompt_len))
        requests = static_requests(warm, spec.cfg, min(WARMUP_GEN, w.gen_len))
        serve(engine(requests), [(0, r) for r in requests])
    counters.reset(model)  # count the measured run only
    counters.record_routing(model, spec.record_routing)
    if dist.is_initialized():
        dist.barrier()
    if spec.trace:
        start_tracing(device)
    requests = static_requests(w, spec.cfg)
    measured = engine(requests, spec.record_logits, eplb_controller(spec, model, rank))
    progress = (lambda t: on_step(t.steps - 1)) if on_step is not None and rank == 0 else None
    transcript = serve(measured, [(0, r) for r in requests], on_step=progress)
    report = RankReport(rank=rank, param_bytes=parameter_bytes(model, spec.cfg.torch_dtype),
                        kv_cache_bytes=measured.runner.kv_cache_bytes, checkpoint_bytes=checkpoint_bytes,
                        counters=counters.snapshot(model, rank), spans=take_spans() if spec.trace else None,
                        eplb=measured.eplb.summary() if measured.eplb else None)
    if not dist.is_initialized():
        return assemble(spec, transcript, [report])
    gathered = [None] * dist.get_world_size() if rank == 0 else None
    dist.gather_object(report, gathered, dst=0)
    return assemble(spec, transcript, gathered) if rank == 0 else None


def run(spec: RunSpec, timeout: float = 600.0) -> RunResult:
    """Validate `spec` and run it on this machine: in this process for one rank, else one local
    process per rank (`launch`, gloo on loopback); the result rank 0 assembled."""
    spec.validate(spec.deployment.world_size)
    if spec.deployment.world_size == 1:
        return run_rank(spec, torch.device("cpu"))
    return launch(functools.partial(run_rank, spec), spec.deployment.world_size, timeout=timeout)
