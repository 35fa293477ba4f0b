"""gpu_check's steps that run the serving engine (5-7, 9 of `gpu_check.py`'s list): `single`, ep1 and
tp1 through a real process group, with every decode forward under CUDA's sync debug mode; one decode
step under torch.profiler; the peak memory of a long prefill against the simulator's."""

from __future__ import annotations

import contextlib
import os
import tempfile
import time
import traceback
from collections.abc import Callable
from contextlib import nullcontext

import torch
import torch.distributed as dist

from expertmesh.config import Workload
from expertmesh.deployment import Deployment
from expertmesh.engine.engine import Engine
from expertmesh.engine.request import Request
from expertmesh.engine.runner import Runner
from expertmesh.engine.serve import serve
from expertmesh.engine.spec import RunSpec
from expertmesh.engine.worker import run_rank, static_engine, static_requests
from expertmesh.launch import init_group
from expertmesh.model.synthetic import materialize
from expertmesh.model.transformer import build_model, parameter_bytes
from expertmesh.parallel.expert import apply_expert_parallel
from expertmesh.parallel.mesh import with_host_twin
from expertmesh.parallel.placement import default_placement
from expertmesh.parallel.tensor import apply_tensor_parallel
from expertmesh.sim.hardware import CATALOGUE

try:  # imported from the `benchmarks` package (tests) or run as a script beside moe_block.py
    from .gpu_device_steps import Ctx, _line
    from .moe_block import per_expert_loop
except ImportError:
    from gpu_device_steps import Ctx, _line
    from moe_block import per_expert_loop


# ---- 5-7: the engine ----
@contextlib.contextmanager
def no_host_sync_in_decode_forwards(ctx: Ctx):
    """Every decode forward (a step whose token bound rank 0 sent) runs with CUDA's sync debug
    mode at "error": a host read inside it raises. The step's one planned read (`Runner._read`)
    is outside the forwards."""
    micro = Runner._micro

    def checked(self, m, chosen, bound):
        if bound is None or not ctx.cuda:
            return micro(self, m, chosen, bound)
        torch.cuda.set_sync_debug_mode("error")
        try:
            return micro(self, m, chosen, bound)
        finally:
            torch.cuda.set_sync_debug_mode("default")

    Runner._micro = checked
    try:
        yield
    finally:
        Runner._micro = micro


def sync_checked(ctx: Ctx, fn: Callable[[], object]) -> tuple[object, str]:
    """`fn()` with decode forwards under the sync check, and the check's verdict; when a host
    sync fails it, `fn()` again without the check, so the later comparisons still have results."""
    if not ctx.cuda:
        return fn(), "not checked (CPU)"
    try:
        with no_host_sync_in_decode_forwards(ctx):
            return fn(), "ok"
    except RuntimeError as exc:
        verdict = f"FAILED: {_line(exc)} at {code_line(exc)}"
    torch.cuda.synchronize(ctx.device)
    return fn(), verdict


def code_line(exc: BaseException) -> str:
    """Where in expertmesh an exception was raised: its innermost frame in the package, as
    `package/module.py:line`, so that a failed sync check names the op that synchronized."""
    frames = [f for f in traceback.extract_tb(exc.__traceback__) if "/expertmesh/" in f.filename]
    if not frames:
        return "outside expertmesh"
    frame = frames[-1]
    return f"{'/'.join(frame.filename.split('/')[-2:])}:{frame.lineno} ({frame.line})"


def _experts(ctx: Ctx):
    return nullcontext() if ctx.grouped else per_expert_loop()


def engine_single(ctx: Ctx) -> dict:
    cfg = ctx.cfg()
    spec = RunSpec(cfg, Deployment(), ctx.sizes.e2e, record_logits=True)
    spec.validate(1)
    t0 = time.perf_counter()
    with _experts(ctx):
        result, verdict = sync_checked(ctx, lambda: run_rank(spec, ctx.device))
    ctx.shared["single"] = (result.tokens, result.logits)
    m = result.metrics
    measured = {"wall_s": time.perf_counter() - t0, "sync_check": verdict, "metrics": m.to_dict(),
                "model": cfg.to_dict()}
    ctx.shared["e2e"] = (cfg, m)
    return measured


def _serve_static(ctx: Ctx, model, cfg, overlap: str = "auto") -> tuple[torch.Tensor, torch.Tensor]:
    """The workload's batch through an engine around `model`: tokens `[B, gen]`, logits `[B, gen, V]`."""
    requests = static_requests(ctx.sizes.e2e, cfg)
    engine = Engine(model, cfg, Deployment(), static_engine(requests, Deployment()), 0,
                    record_logits=True, overlap=overlap)
    t = serve(engine, [(0, r) for r in requests])
    ids = [r.id for r in requests]
    return (torch.tensor([t.tokens[i] for i in ids]),
            torch.stack([torch.stack(list(t.logits[i])) for i in ids]).float())


def engine_ep1(ctx: Ctx) -> dict:
    """ep1 / tp1 through a real process group of one (NCCL + gloo twin on a GPU), each variant
    checked apart: a failure is its row's, not the step's."""
    cfg, s = ctx.cfg(), ctx.sizes
    backend = "nccl" if ctx.cuda else "gloo"
    store_dir = tempfile.mkdtemp(prefix="gpu-check-")
    init_group(backend, dist.FileStore(os.path.join(store_dir, "store"), 1), 0, 1, 300.0, ctx.device)
    group = with_host_twin(dist.group.WORLD)
    placement = default_placement(cfg.n_layers, cfg.n_experts, 1)
    few = s.decode_batch + 1  # every decode forward of the batch takes the low-latency exchange
    # (transform, overlap, sync-free decode): the standard exchange reads its counts on the host
    # by design (then uneven all-to-alls), so the chunked variant is not held to the sync check
    variants = {
        "ep1 low-latency exchange": (lambda m: apply_expert_parallel(m, group, 0, placement,
                                                                     low_latency_threshold=few), "chunks", True),
        "ep1 two-batch overlap": (lambda m: apply_expert_parallel(m, group, 0, placement,
                                                                  low_latency_threshold=few), "tbo", True),
        "ep1 chunked exchange": (lambda m: apply_expert_parallel(m, group, 0, placement, chunks=2,
                                                                 low_latency_threshold=0), "chunks", False),
        "tp1 (tensor-parallel layers)": (lambda m: apply_tensor_parallel(m, group, 1, 0), "auto", True),
    }
    ref_tokens, ref_logits = ctx.shared["single"]
    out = {"backend": backend}
    try:
        for name, (transform, overlap, sync_free) in variants.items():
            t0 = time.perf_counter()
            try:
                model = materialize(transform(build_model(cfg)), 0, cfg.torch_dtype, ctx.device)
                with _experts(ctx):
                    if sync_free:
                        (tokens, logits), verdict = sync_checked(ctx, lambda: _serve_static(ctx, model, cfg, overlap))
                    else:
                        tokens, logits = _serve_static(ctx, model, cfg, overlap)
                        verdict = "not checked (the standard exchange's planned host read of its counts)"
                match = bool(torch.equal(tokens, ref_tokens))
                out[name] = {"ok": match and not verdict.startswith("FAILED"), "sync_check": verdict,
                             "wall_s": time.perf_counter() - t0, "tokens_match": match,
                             "max_abs_logit_diff": (logits - ref_logits.float()).abs().max().item()}
            except Exception as exc:  # a variant's failure is reported, the others still run
                out[name] = {"ok": False, "error": _line(exc)}
            finally:
                model = None
                if ctx.cuda:
                    torch.cuda.empty_cache()
    finally:
        dist.destroy_process_group()
    return out


def decode_profile(ctx: Ctx) -> dict:
    """One engine decode step of the `single` model under torch.profiler."""
    from torch.profiler import ProfilerActivity, profile

    cfg, s = ctx.cfg(), ctx.sizes
    model = materialize(build_model(cfg), 0, cfg.torch_dtype, ctx.device)
    requests = [Request(i, list(range(1, s.e2e.prompt_len + 1)), 4) for i in range(s.decode_batch)]
    engine = Engine(model, cfg, Deployment(), static_engine(requests, Deployment()), 0)
    for r in requests:
        engine.add_request(r)
    with _experts(ctx):
        engine.step()  # prefill
        engine.step()  # a first decode step: its kernels loaded
        ctx.sync()
        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if ctx.cuda else [])
        with profile(activities=activities) as prof:
            t0 = time.perf_counter()
            engine.step()
            host = time.perf_counter() - t0
            ctx.sync()
    events = prof.events()
    kernels = [e for e in events if e.device_type == torch.autograd.DeviceType.CUDA]
    device = sum(e.device_time_total for e in kernels) / 1e6 if kernels else None
    prof.export_chrome_trace(str(ctx.out_dir / "decode_step_trace.json"))
    ops = sum(1 for e in events if e.name.startswith("aten::") and e.cpu_parent is None)
    return {"host_s": host, "kernels": len(kernels), "device_busy_s": device, "top_level_aten_ops": ops,
            "batch": s.decode_batch, "n_layers": cfg.n_layers, "trace": "decode_step_trace.json"}


def prefill_memory(ctx: Ctx) -> dict:
    """Peak memory of one layer's engine prefill of `prefill` sequences x tokens, less the layer's
    weights and KV pool: the activations, against `sim/memory.py`'s per-GPU figure for an EP
    rank of the seed's run (ep16, batch 16 x sequences, the same prompt length)."""
    from expertmesh.sim.memory import peak_activations
    from expertmesh.sim.scenario import Scenario

    seqs, n = ctx.sizes.prefill
    cfg = ctx.cfg(n_layers=1, max_seq_len=max(ctx.cfg().max_seq_len, n + 16))
    model = materialize(build_model(cfg), 0, cfg.torch_dtype, ctx.device)
    requests = [Request(i, [(7 * i + j) % cfg.vocab_size for j in range(n)], 1) for i in range(seqs)]
    engine = Engine(model, cfg, Deployment(), static_engine(requests, Deployment()), 0)
    held = parameter_bytes(model, cfg.torch_dtype) + engine.runner.kv_cache_bytes
    if ctx.cuda:
        ctx.sync()
        torch.cuda.reset_peak_memory_stats(ctx.device)
        base = torch.cuda.memory_allocated(ctx.device)
    t0 = time.perf_counter()
    with _experts(ctx):
        for r in requests:
            engine.add_request(r)
        engine.step()
        ctx.sync()
    took = time.perf_counter() - t0
    ep = min(16, cfg.n_experts)  # the seed's ep16 (the dry run's model has fewer experts)
    ep16 = Scenario(cfg, Deployment(ep=ep), Workload(batch_size=ep * seqs, prompt_len=n, gen_len=1),
                    CATALOGUE["h100"])
    activations, buffers = peak_activations(ep16)
    row = {"tokens": seqs * n, "s": took, "weights_and_kv_bytes": held,
           "simulated_activation_bytes": activations, "simulated_buffer_bytes": buffers}
    if ctx.cuda:
        row["measured_activation_bytes"] = torch.cuda.max_memory_allocated(ctx.device) - base
        row["measured_over_simulated"] = row["measured_activation_bytes"] / activations
    return row
