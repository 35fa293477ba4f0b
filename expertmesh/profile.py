"""`expertmesh profile`: the anatomy of one decode step per rank, in units that carry over from
CPU to GPU.

    expertmesh profile --preset small --deployment ep2 --batch 8 --context 1024 --json p.json

Each rank serves `batch` requests of `context` prompt tokens (low-latency exchange where EP
applies, no two-batch overlap, so that layers run one after another), then decodes `steps`
steps and reports:
- `ops_per_layer`: aten ops per decoder layer, averaged over layers and steps (`op_count.py`);
  `ops_per_step`, `collectives_per_step` (c10d ops) likewise per step;
- `host_reads_per_step`: device-to-host reads in one decode step. On CUDA the real ones; on the
  CPU the engine runs a second time on the pretend device (`pretend_device.py`), which counts
  every read a GPU would make;
- `kv_bytes_read`: bytes of KV the step's attention ops read, measured on the dispatched ops:
  what they read from the pools, plus every read of a copy made from the pools (the torch
  backends gather each sequence's blocks and read the copy); `kv_bytes_resident`: bytes of KV
  the decoding sequences hold (what attention reading the pool in place reads once);
- `host_ms_per_step`: wall ms of an engine step outside the model's forward (control, scheduling,
  the step's plan, sampling's host part; on CUDA also the wait for the device at the step's read);
- `attention_backend`: the backend the runner planned the step with;
- `expert_kernels`: the experts' kernel per rows-per-expert bucket (`--expert-kernel`; auto,
  the default, times them on this machine: the loop kernel adds a matmul per expert to the ops);
- on CUDA, `kernels_per_step` and `device_ms_per_step` from `torch.profiler`, and
  `decode_ms_per_step` (wall ms of the whole step).

Every figure above is of an eager engine (decode graphs off): a step that replays a CUDA graph
dispatches no aten op, so counting one finds no ops, no reads and no KV. On CUDA the step as the
engine runs it by default is timed apart, on an engine of its own: `cuda_graphs` (whether decode
graphs were captured, `engine/graphs.py`: a decode step whose batch fits a bucket replays one),
`graphs_decode_ms` (wall ms per decode step), `graphs_device_ms_per_step` and
`graphs_kernels_per_step`.
"""

from __future__ import annotations

import functools
import json
import time
from contextlib import contextmanager

import torch
import torch.distributed as dist
from torch.utils._pytree import tree_flatten

from expertmesh.config import Workload, preset
from expertmesh.deployment import Deployment
from expertmesh.engine.engine import Engine
from expertmesh.engine.request import Request
from expertmesh.engine.scheduler import EngineConfig
from expertmesh.engine.shard import load_rank
from expertmesh.engine.spec import RunSpec
from expertmesh.launch import check_launch, launch
from expertmesh.model import moe
from expertmesh.model.expert_kernels import SETTINGS
from expertmesh.op_count import OpCounter, counted, per_layer
from expertmesh.parallel.dispatch import LOW_LATENCY_TOKENS
from expertmesh.pretend_device import FakeDevice, move_to_device
from expertmesh.run_flags import check_output

KEYS = ("ops_per_layer", "host_reads_per_step", "kv_bytes_read", "kv_bytes_resident", "host_ms_per_step",
        "attention_backend")
# Ops that copy their input (or part of it) and nothing else: their output from KV is KV again.
_COPIES = {"index_select", "index", "gather", "cat", "clone", "_to_copy", "copy_", "stack", "pad",
           "constant_pad_nd"}


class KVReads(OpCounter):
    """An `OpCounter` that also sums the bytes of KV its ops read (`kv_bytes`): from tensors on
    the storage of a pool, the bytes the op returns (a gather reads what it returns); from copies
    of pool data, their whole size."""

    def __init__(self, pools: list[torch.Tensor]):
        super().__init__()
        self.pools = {t.untyped_storage().data_ptr() for t in pools}
        self.copies: set[int] = set()
        self.kv_bytes = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = super().__torch_dispatch__(func, types, args, kwargs)
        if not counted(func):  # a view reads nothing (and shares its base's storage)
            return out
        inputs = [t for t in _read_arguments(func, args, kwargs or {}) if isinstance(t, torch.Tensor)]
        from_pool = [t for t in inputs if _storage(t) in self.pools]
        from_copy = [t for t in inputs if _storage(t) in self.copies]
        outputs = [t for t in tree_flatten(out)[0] if isinstance(t, torch.Tensor)]
        if from_pool:
            self.kv_bytes += sum(t.nbytes for t in outputs)
        self.kv_bytes += sum(t.nbytes for t in from_copy)
        if (from_pool or from_copy) and func.__name__.split(".")[0] in _COPIES:
            self.copies.update(_storage(t) for t in outputs)
        return out


def _read_arguments(func, args, kwargs) -> list:
    """The arguments `func` reads: all but those its schema writes (`self` of an in-place op,
    `out=`)."""
    read = []
    for i, arg in enumerate(func._schema.arguments):
        value = args[i] if i < len(args) else kwargs.get(arg.name)
        if arg.alias_info is None or not arg.alias_info.is_write:
            read.extend(tree_flatten(value)[0])
    return read


def _storage(t: torch.Tensor) -> int:
    try:
        return t.untyped_storage().data_ptr()
    except (RuntimeError, NotImplementedError):  # a wrapper without storage
        return -1


def _requests(batch: int, context: int, steps: int, vocab: int) -> list[Request]:
    """Enough tokens for the prefill, the warm-up step and both measured passes."""
    return [Request(i, tuple((7 * i + 3 * j) % (vocab - 1) + 1 for j in range(context)), 2 * steps + 4)
            for i in range(batch)]


def _engine(spec: RunSpec, model, batch: int, context: int, steps: int, rank: int, links,
            graphs: str = "off") -> Engine:
    """`graphs`: the decode graph mode (`engine/graphs.py`); "off" for every engine whose ops are
    counted, since a replayed graph dispatches none."""
    longest = context + 2 * steps + 4
    block = 16
    config = EngineConfig(block_size=block, num_blocks=batch * -(-longest // block) + 1,
                          max_batched_tokens=batch * longest, max_seqs=batch, chunked_prefill=False)
    eng = Engine(model, spec.cfg, spec.deployment, config, rank, links, overlap="none", graphs=graphs)
    if rank == 0:
        for r in _requests(batch, context, steps, spec.cfg.vocab_size):
            eng.add_request(r)
    eng.step()  # prefill
    eng.step()  # one decode step to warm up
    return eng


def _stop(eng: Engine, rank: int) -> None:
    if rank == 0:
        eng.shutdown()
    else:
        eng.follow()


@contextmanager
def _forward_timer(model, spent: list[float]):
    inner = model.forward_paged

    def timed(*args, **kwargs):
        start = time.perf_counter()
        try:
            return inner(*args, **kwargs)
        finally:
            spent.append(time.perf_counter() - start)

    model.forward_paged = timed
    try:
        yield
    finally:
        del model.forward_paged


def profile_rank(spec: RunSpec, batch: int, context: int, steps: int, device: torch.device) -> list[dict]:
    """Every rank's figures (on every rank), for `steps` decode steps of `batch` x `context`."""
    rank = dist.get_rank() if dist.is_initialized() else 0
    model, links, _ = load_rank(spec, device)
    eng = _engine(spec, model, batch, context, steps, rank, links)
    pools = eng.runner.pools
    counter = KVReads([t for p in pools.values() for t in (p.k, p.v)])
    with per_layer(model, counter) as layer_ops, counter, torch.inference_mode():
        for _ in range(steps):
            eng.step()
    forward: list[float] = []
    walls = []
    with _forward_timer(model, forward):
        for _ in range(steps):
            start = time.perf_counter()
            eng.step()
            walls.append(time.perf_counter() - start)
    mine = {
        "rank": rank,
        "ops_per_layer": sum(layer_ops) / max(1, len(layer_ops)),
        "ops_per_step": counter.ops / steps,
        "collectives_per_step": counter.collectives / steps,
        "ops_by_name_per_step": {k: v / steps for k, v in counter.by_name.most_common()},
        "kv_bytes_read": counter.kv_bytes // steps,
        "kv_bytes_resident": _resident(eng),
        "host_ms_per_step": 1e3 * (sum(walls) - sum(forward)) / steps,
        "attention_backend": eng.runner.backend.name,
        "expert_kernels": _expert_kernels(model),
    }
    if device.type == "cuda":
        mine["decode_ms_per_step"] = 1e3 * sum(walls) / steps
        mine.update(_cuda_profile(eng))
    _stop(eng, rank)
    if device.type == "cuda":
        del eng, model, links, pools  # freed before the graphs engine loads its own copy
        mine.update(_cuda_graphs_profile(spec, batch, context, steps, device, rank))
    mine["host_reads_per_step"] = _host_reads(spec, batch, context, steps, device, rank)
    if not dist.is_initialized():
        return [mine]
    everyone = [None] * dist.get_world_size()
    dist.all_gather_object(everyone, mine)
    return everyone


def _resident(eng: Engine) -> int:
    """Bytes of KV the running sequences hold in the pools of this rank's layers."""
    positions = sum(seq.computed for seq in eng.scheduler.running)
    per_position = sum(p.nbytes // (p.k.shape[0] * p.k.shape[1]) for p in eng.runner.pools.values())
    return positions * per_position


def _host_reads(spec: RunSpec, batch: int, context: int, steps: int, device: torch.device, rank: int) -> int:
    """Device-to-host reads of one decode step: on CUDA counted on the real device, on the CPU
    on the pretend one (the same engine again, weights and pools on it)."""
    if device.type == "cuda":
        model, links, _ = load_rank(spec, device)
        counter = _CudaReads()
        eng = _engine(spec, model, batch, context, steps, rank, links)
        with counter:
            eng.step()
        _stop(eng, rank)
        return counter.reads
    model, links, _ = load_rank(spec, torch.device("cpu"))
    # the pretend device answers for the expert kernel as the CPU does
    cfg = spec.cfg
    grouped = moe._grouped_mm_applies(torch.empty(1, cfg.d_model, dtype=cfg.torch_dtype), cfg.expert_hidden)
    applies, moe._grouped_mm_applies = moe._grouped_mm_applies, lambda x, hidden: grouped
    try:
        with FakeDevice() as mode:
            eng = _engine(spec, move_to_device(model), batch, context, steps, rank, links)
            before = mode.syncs
            eng.step()
            reads = mode.syncs - before
            _stop(eng, rank)
    finally:
        moe._grouped_mm_applies = applies
    return reads


class _CudaReads(OpCounter):
    """Counts reads of CUDA values on the host: copies to the CPU and scalar reads."""

    def __init__(self):
        super().__init__()
        self.reads = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.__name__.split(".")[0]
        tensors = [t for t in tree_flatten((args, kwargs))[0] if isinstance(t, torch.Tensor)]
        on_cuda = any(t.device.type == "cuda" for t in tensors)
        out = super().__torch_dispatch__(func, types, args, kwargs)
        if on_cuda and name in ("_local_scalar_dense", "item", "is_nonzero", "equal"):
            self.reads += 1
        elif on_cuda and name in ("_to_copy", "copy_"):
            outs = [t for t in tree_flatten(out)[0] if isinstance(t, torch.Tensor)]
            self.reads += any(t.device.type == "cpu" for t in outs)
        return out


def _cuda_profile(eng: Engine) -> dict:
    """One decode step under `torch.profiler`: kernels launched and their device time."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        eng.step()
        torch.cuda.synchronize()
    kernels = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
    return {"kernels_per_step": len(kernels),
            "device_ms_per_step": sum(e.device_time_total for e in kernels) / 1e3}


def _cuda_graphs_profile(spec: RunSpec, batch: int, context: int, steps: int, device: torch.device,
                         rank: int) -> dict:
    """The decode step as the engine runs it by default (`spec.graphs`: captured graphs where
    they apply): wall ms per step, and one step's kernels and device time."""
    model, links, _ = load_rank(spec, device)
    eng = _engine(spec, model, batch, context, steps, rank, links, graphs=spec.graphs)
    graphs = eng.runner.graphs
    walls = []
    for _ in range(steps):
        start = time.perf_counter()
        eng.step()  # ends reading the sampled tokens, so after the device's work
        walls.append(time.perf_counter() - start)
    timed = _cuda_profile(eng)
    _stop(eng, rank)
    return {"cuda_graphs": graphs is not None and bool(graphs.graphs),
            "graphs_decode_ms": 1e3 * sum(walls) / steps,
            "graphs_device_ms_per_step": timed["device_ms_per_step"],
            "graphs_kernels_per_step": timed["kernels_per_step"]}


def _expert_kernels(model) -> dict[str, str]:
    """The experts' kernel plan this rank ran (`model/expert_kernels.py`): rows per expert ->
    kernel, as `--expert-kernel` resolved it (auto: timed on this machine, or its cache). The
    kernels differ in ops per layer (loop: one matmul per expert) and in host reads."""
    plans = {m.kernels for m in model.modules() if isinstance(m, moe.GroupedExperts)}
    return {rows: kernel for plan in plans for rows, kernel in plan.to_json().items()}


def spec_for(args) -> RunSpec:
    """The validated plan of `profile`'s flags; raises ValueError (one line) on a bad one."""
    from expertmesh.checkpoint import config_from_hf

    for flag, value in (("--batch", args.batch), ("--context", args.context), ("--steps", args.steps)):
        if value < 1:
            raise ValueError(f"{flag} {value} must be a positive integer")
    cfg = config_from_hf(args.model, args.dtype) if args.model else preset(
        args.preset, **({"dtype": args.dtype} if args.dtype else {}))
    if args.context + 2 * args.steps + 4 > cfg.max_seq_len:
        raise ValueError(f"--context {args.context} leaves no room for {args.steps} decode steps within "
                         f"the model's {cfg.max_seq_len} positions; lower --context")
    deployment = Deployment.parse(args.deployment)
    if deployment.pp > 1:
        raise ValueError(f"profile runs deployments without pipeline stages; {deployment.name} has "
                         f"{deployment.pp}")
    spec = RunSpec(cfg, deployment, Workload(batch_size=args.batch), seed=args.seed, checkpoint=args.model,
                   low_latency_tokens=max(LOW_LATENCY_TOKENS, args.batch), overlap="none",
                   expert_kernel=args.expert_kernel)
    spec.validate(deployment.world_size)
    return spec


def cmd_profile(args) -> int:
    check_output("--json", args.json)
    spec = spec_for(args)
    check_launch(spec.deployment.world_size, args.backend, args.timeout)
    run = functools.partial(profile_rank, spec, args.batch, args.context, args.steps)
    if spec.deployment.world_size == 1:
        ranks = run(torch.device("cuda" if torch.cuda.is_available() else "cpu"))
    else:
        ranks = launch(run, spec.deployment.world_size, backend=args.backend, timeout=args.timeout)
    if ranks is None:  # a torchrun rank other than 0
        return 0
    for r in ranks:
        print(f"rank {r['rank']}: {r['ops_per_layer']:.1f} ops/layer, {r['host_reads_per_step']} host "
              f"reads/step, KV read {r['kv_bytes_read'] / 2**20:.1f} MiB of {r['kv_bytes_resident'] / 2**20:.1f} "
              f"MiB resident, host {r['host_ms_per_step']:.2f} ms/step, attention: {r['attention_backend']}")
        if "graphs_decode_ms" in r:
            print(f"rank {r['rank']}: decode step {r['decode_ms_per_step']:.2f} ms eager "
                  f"({r['device_ms_per_step']:.2f} ms on the device), {r['graphs_decode_ms']:.2f} ms "
                  f"{'replaying CUDA graphs' if r['cuda_graphs'] else 'without graphs (none captured)'} "
                  f"({r['graphs_device_ms_per_step']:.2f} ms on the device)")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"model": spec.cfg.name, "deployment": spec.deployment.name, "batch": args.batch,
                       "context": args.context, "steps": args.steps, "ranks": ranks}, f, indent=1)
    return 0


def add_commands(sub) -> None:
    p = sub.add_parser("profile", help="ops per layer, host reads, KV bytes and host time of a decode step, per rank")
    p.add_argument("--preset", default="small", help="model preset: tiny, small, paper (default small)")
    p.add_argument("--model", default=None, help="a Hugging Face model directory instead of a preset")
    p.add_argument("--dtype", default=None, help="fp32 or bf16 (default: the preset's)")
    p.add_argument("--deployment", default="single", help="single, ep2, tp2, ... (no pipeline stages)")
    p.add_argument("--batch", type=int, default=8, help="decoding sequences (default 8)")
    p.add_argument("--context", type=int, default=1024, help="prompt tokens per sequence (default 1024)")
    p.add_argument("--steps", type=int, default=3, help="decode steps measured (default 3)")
    p.add_argument("--seed", type=int, default=0, help="seed of the synthetic weights")
    p.add_argument("--expert-kernel", default="auto",
                   help=f"the experts' matmuls ({', '.join(SETTINGS)}; default auto: the faster as "
                        "timed on this machine, as serve takes it)")
    p.add_argument("--backend", default=None, help="gloo or nccl (default: nccl with CUDA, else gloo)")
    p.add_argument("--timeout", type=float, default=600.0, help="seconds before a stuck run is stopped")
    p.add_argument("--json", default=None, help="write every rank's figures to this file")
    p.set_defaults(func=cmd_profile)
