"""First contact with one GPU: run every path the engine takes on it, check it, time it, and write
a profile the simulator can load.

    python benchmarks/gpu_check.py --out gpu-check          # one CUDA GPU: about 2 minutes
    python benchmarks/gpu_check.py --dry-run --out /tmp/gc  # tiny sizes on the CPU: the logic

Each step is a named function of `STEPS`; a failing step records `ok: false` and its error line
and the next one runs. Estimates on one H200 (bf16, the `paper` preset's shapes):
  1. expert matmuls (~5 s): one expert's up/down matmuls (d_model 4096, hidden 16384) at 1 ..
     16384 rows, timed with CUDA events over back-to-back calls; fp32 at the largest: the GEMM
     peak and half-efficiency rows (`calibrate.fit_gemm`)
  2. memory bandwidth (~1 s): a 2 GiB device copy
  3. launch (~1 s): host enqueue per tiny kernel (after a warm-up, which also loads the kernel),
     device time per tiny kernel, and one synchronize's round trip, apart
  4. attention backends (~15 s): decode attention over a 10k context, 8 sequences, 32 heads,
     MHA and GQA (8 KV heads), as the engine runs it (each backend of `attention_backends`) and as
     contiguous SDPA; each under `sdpa_kernel` limited to the fused kernels, so a silent fall back
     to the math kernel fails loudly; bytes of K and V read per second
  5. engine single (~25 s): `preset("paper", n_layers=2)`, batch 8, prompt 512, 16 tokens through
     the serving engine, the decode forwards under `torch.cuda.set_sync_debug_mode("error")`: a
     hidden host sync inside a forward fails the step; TTFT / TPOT and the simulator's prediction
  6. engine ep1 (~40 s): the same through a real process group of one (NCCL with its gloo twin,
     the engine's control `Messages`, the exchange choice): the all-to-all dispatcher with the
     low-latency exchange, with two-batch overlap, with chunked overlap, and tp1; each under the
     sync check, tokens and logits against step 5's
  7. decode profile (~10 s): `torch.profiler` on one engine decode step of step 5's model: kernels
     launched, host time of the step against the device time of its kernels
  8. sampling (~3 s): the engine's sampling at temperature 1 for 8 and 128 rows
  9. prefill memory (~20 s): peak memory of one `paper` layer's engine prefill of 8 x 10k tokens
     (an EP rank's 80k tokens in the seed's 128 x 10k run under ep16; its activations are those
     of all 16 experts' rows, which that rank receives), against `sim/memory.py`'s figure
Writes DIR/gpu_check.json (every step) and DIR/profile.json (a `HardwareProfile`: `expertmesh
simulate --hardware DIR/profile.json`). Links (NVLink, network) cannot be measured on one GPU and
come from the catalogue entry of the same GPU (H100 when none matches).

New paths (attention backends, CUDA graphs, device sampling) get a step here: a function
`(Ctx) -> dict` added to `STEPS`; an attention backend an entry in `attention_backends`.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from expertmesh.config import Workload, preset
from expertmesh.deployment import Deployment
from expertmesh.engine.engine import Engine
from expertmesh.engine.request import Request
from expertmesh.engine.runner import Runner
from expertmesh.engine.sampling import finish_draws, start_draws
from expertmesh.engine.serve import serve
from expertmesh.engine.spec import RunSpec
from expertmesh.engine.worker import run_rank, static_engine, static_requests
from expertmesh.launch import init_group
from expertmesh.model.paged import KVPool, PagedBatch, PagedView
from expertmesh.model.synthetic import materialize
from expertmesh.model.transformer import build_model, parameter_bytes
from expertmesh.parallel.expert import apply_expert_parallel
from expertmesh.parallel.mesh import with_host_twin
from expertmesh.parallel.placement import default_placement
from expertmesh.parallel.tensor import apply_tensor_parallel
from expertmesh.sim.calibrate import fit_gemm
from expertmesh.sim.hardware import CATALOGUE, HardwareProfile

try:  # imported from the `benchmarks` package (tests) or run as a script beside moe_block.py
    from .moe_block import per_expert_loop
except ImportError:
    from moe_block import per_expert_loop


@dataclass(frozen=True)
class Sizes:
    d_model: int
    hidden: int
    token_counts: tuple[int, ...]
    heads: int
    kv_heads: tuple[int, ...]   # attention cases: MHA, then GQA
    head_dim: int
    kv_len: int
    decode_batch: int
    model: dict                 # preset("paper", **model) for the engine steps
    e2e: Workload
    sample_rows: tuple[int, ...]
    prefill: tuple[int, int]    # (sequences, tokens each) of the prefill memory step
    copy_bytes: int
    reps: int


GPU = Sizes(d_model=4096, hidden=16384, token_counts=tuple(2 ** i for i in range(15)), heads=32,
            kv_heads=(32, 8), head_dim=128, kv_len=10_000, decode_batch=8, model={"n_layers": 2},
            e2e=Workload(batch_size=8, prompt_len=512, gen_len=16), sample_rows=(8, 128),
            prefill=(8, 10_000), copy_bytes=2 << 30, reps=5)
TINY_MODEL = dict(d_model=64, n_heads=4, head_dim=16, n_experts=4, expert_hidden=128, vocab_size=128,
                  max_seq_len=512, n_layers=2)
DRY = Sizes(d_model=64, hidden=256, token_counts=(1, 4, 16, 64), heads=4, kv_heads=(4, 2), head_dim=16,
            kv_len=100, decode_batch=2, model=TINY_MODEL, e2e=Workload(batch_size=2, prompt_len=8, gen_len=4),
            sample_rows=(2, 8), prefill=(2, 64), copy_bytes=1 << 20, reps=2)


@dataclass
class Ctx:
    """What the steps share: sizes, device, dtype, and what earlier steps left for later ones."""

    sizes: Sizes
    device: torch.device
    dtype: torch.dtype
    grouped: bool
    out_dir: Path
    shared: dict = field(default_factory=dict)

    @property
    def cuda(self) -> bool:
        return self.device.type == "cuda"

    @property
    def model_dtype(self) -> str:
        return "bf16" if self.dtype == torch.bfloat16 else "fp32"

    def cfg(self, **over):
        return preset("paper", dtype=self.model_dtype, **{**self.sizes.model, **over})

    def sync(self) -> None:
        if self.cuda:
            torch.cuda.synchronize(self.device)


def device_time(ctx: Ctx, fn: Callable[[], object], calls: int = 10) -> float:
    """Seconds per call of `fn`, `calls` back to back after a warm-up, median of `reps` runs:
    between CUDA events on a GPU (no synchronize inside), host time on the CPU."""
    fn()
    times = []
    for _ in range(ctx.sizes.reps):
        ctx.sync()
        if ctx.cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            for _ in range(calls):
                fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) / 1e3 / calls)
        else:
            t0 = time.perf_counter()
            for _ in range(calls):
                fn()
            times.append((time.perf_counter() - t0) / calls)
    return statistics.median(times)


# ---- 1-3: the device's raw figures ----
def expert_matmuls(ctx: Ctx) -> dict:
    s, gen = ctx.sizes, torch.Generator().manual_seed(0)
    w_up = (torch.randn(s.hidden, s.d_model, generator=gen) / s.d_model ** 0.5).to(ctx.device, ctx.dtype)
    w_down = (torch.randn(s.d_model, s.hidden, generator=gen) / s.hidden ** 0.5).to(ctx.device, ctx.dtype)
    rows = {}
    for tokens in s.token_counts:
        x = torch.randn(tokens, s.d_model, generator=gen).to(ctx.device, ctx.dtype)
        t = device_time(ctx, lambda: F.linear(F.gelu(F.linear(x, w_up)), w_down))
        rows[tokens] = {"s": t, "flops": 4 * tokens * s.d_model * s.hidden / t}
    big = max(s.token_counts)
    x32, up32, down32 = (torch.randn(big, s.d_model, generator=gen).to(ctx.device), w_up.float(), w_down.float())
    t32 = device_time(ctx, lambda: F.linear(F.gelu(F.linear(x32, up32)), down32), calls=2)
    peak, half = fit_gemm({t: r["flops"] for t, r in rows.items()})
    return {"bf16": rows, "fitted_peak_flops": peak, "half_tokens": half,
            "fp32_largest": {"tokens": big, "s": t32, "flops": 4 * big * s.d_model * s.hidden / t32}}


def memory_bandwidth(ctx: Ctx) -> dict:
    src = torch.empty(ctx.sizes.copy_bytes // 2, dtype=torch.bfloat16, device=ctx.device)
    dst = torch.empty_like(src)
    t = device_time(ctx, lambda: dst.copy_(src), calls=5)
    return {"bytes_moved": 2 * src.nbytes, "s": t, "bandwidth": 2 * src.nbytes / t}


def launch(ctx: Ctx, n: int = 1000) -> dict:
    """Host enqueue per tiny kernel (what launches cost the host), device time per tiny kernel,
    and a synchronize's round trip; the warm-up loads the kernel (CUDA loads modules lazily: the
    first call of a kernel takes milliseconds, which the last gpu_check counted as launch)."""
    x = torch.zeros(1, device=ctx.device)
    for _ in range(10):
        x.add_(1)
    ctx.sync()
    t0 = time.perf_counter()
    for _ in range(n):
        x.add_(1)
    enqueue = (time.perf_counter() - t0) / n
    ctx.sync()
    rounds = []
    for _ in range(20):
        t0 = time.perf_counter()
        ctx.sync()
        rounds.append(time.perf_counter() - t0)
    return {"enqueue_s": enqueue, "device_s": device_time(ctx, lambda: x.add_(1), calls=n),
            "sync_round_trip_s": statistics.median(rounds)}


# ---- 4: attention ----
def attention_backends() -> dict[str, Callable]:
    """Decode attention as the engine can run it: name -> fn(pool, batch, q, k, v) -> `[1, N, h, d]`.
    Another backend (FlashInfer, ...) adds its entry here and is checked and timed by step 4."""
    return {"torch paged (model/paged.py)": lambda pool, batch, q, k, v: PagedView(pool, batch).attend(q, k, v)}


def fused_only(ctx: Ctx):
    """SDPA limited to its fused kernels on a GPU: no silent math fallback (the CPU has only its
    flash kernel and math, both allowed in a dry run)."""
    if ctx.cuda:
        return sdpa_kernel([SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION,
                            SDPBackend.CUDNN_ATTENTION])
    return sdpa_kernel([SDPBackend.FLASH_ATTENTION, SDPBackend.MATH])


def attention(ctx: Ctx) -> dict:
    s, gen, out = ctx.sizes, torch.Generator().manual_seed(1), {}
    b, h, d, block = s.decode_batch, s.heads, s.head_dim, 16
    lens = [s.kv_len - i for i in range(b)]  # ragged, as a real batch: the paged path needs its mask
    for g in s.kv_heads:
        case = f"{'MHA' if g == h else 'GQA'} h{h} g{g}"
        tables, nb = [], 0
        for n in lens:
            tables.append(list(range(nb, nb + -(-n // block))))
            nb += len(tables[-1])
        pool = KVPool(nb, block, g, d, ctx.dtype, ctx.device)
        pool.k.normal_()
        pool.v.normal_()
        batch = PagedBatch([(n - 1, 1, t) for n, t in zip(lens, tables)], block, ctx.device)
        q = torch.randn(1, b, h, d, generator=gen).to(ctx.device, ctx.dtype)
        k, v = (torch.randn(1, b, g, d, generator=gen).to(ctx.device, ctx.dtype) for _ in range(2))
        read = sum(lens) * g * d * 2 * pool.k.element_size()
        # the reference: each sequence's own context (the new k, v written first, as attend does)
        for pool_t, new in ((pool.k, k), (pool.v, v)):
            for i, (n, t) in enumerate(zip(lens, tables)):
                pool_t[t[(n - 1) // block], (n - 1) % block] = new[0, i]
        ks, vs = ([F.pad(p[t].reshape(-1, g, d)[:n], (0, 0, 0, 0, 0, max(lens) - n)).transpose(0, 1)
                   for n, t in zip(lens, tables)] for p in (pool.k, pool.v))
        kc, vc = torch.stack(ks), torch.stack(vs)  # [b, g, S, d]
        mask = (torch.arange(max(lens), device=ctx.device)[None, :]
                < torch.tensor(lens, device=ctx.device)[:, None])[:, None, None, :]
        qc = q[0][:, :, None]  # [b, h, 1, d]
        with sdpa_kernel([SDPBackend.MATH]):
            reference = F.scaled_dot_product_attention(qc, kc, vc, attn_mask=mask, enable_gqa=g != h)[:, :, 0]
        rows = {}
        with fused_only(ctx):
            rows["contiguous SDPA (no mask)"] = _attention_row(
                ctx, lambda: F.scaled_dot_product_attention(qc, kc, vc, enable_gqa=g != h),
                b * max(lens) * g * d * 2 * kc.element_size(), None, None)
            for name, fn in attention_backends().items():
                rows[name] = _attention_row(ctx, lambda: fn(pool, batch, q, k, v), read,
                                            lambda o: o[0], reference)
        out[case] = rows
    return out


def _attention_row(ctx: Ctx, fn, read: int, to_bhd, reference) -> dict:
    try:
        o = fn()
        diff = None if to_bhd is None else (to_bhd(o).float() - reference.float()).abs().max().item()
        t = device_time(ctx, fn)
        tolerance = 1e-4 if ctx.dtype == torch.float32 else 3e-2
        return {"ok": diff is None or diff <= tolerance, "s": t, "kv_bytes_read": read, "bandwidth": read / t, "max_abs_diff": diff}
    except RuntimeError as exc:  # "No available kernel": only the math kernel would take it
        return {"ok": False, "error": _line(exc)}


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
        verdict = f"FAILED: {_line(exc)}"
    torch.cuda.synchronize(ctx.device)
    return fn(), verdict


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
    variants = {
        "ep1 low-latency exchange": (lambda m: apply_expert_parallel(m, group, 0, placement,
                                                                     low_latency_threshold=few), "chunks"),
        "ep1 two-batch overlap": (lambda m: apply_expert_parallel(m, group, 0, placement,
                                                                  low_latency_threshold=0), "tbo"),
        "ep1 chunked exchange": (lambda m: apply_expert_parallel(m, group, 0, placement, chunks=2,
                                                                 low_latency_threshold=0), "chunks"),
        "tp1 (tensor-parallel layers)": (lambda m: apply_tensor_parallel(m, group, 1, 0), "auto"),
    }
    ref_tokens, ref_logits = ctx.shared["single"]
    out = {"backend": backend}
    try:
        for name, (transform, overlap) in variants.items():
            t0 = time.perf_counter()
            try:
                model = materialize(transform(build_model(cfg)), 0, cfg.torch_dtype, ctx.device)
                with _experts(ctx):
                    (tokens, logits), verdict = sync_checked(ctx, lambda: _serve_static(ctx, model, cfg, overlap))
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


def sampling(ctx: Ctx) -> dict:
    V, out = ctx.cfg().vocab_size, {}
    for rows in ctx.sizes.sample_rows:
        logits = torch.randn(rows, V, device=ctx.device, dtype=torch.float32)

        def draw():
            d = start_draws(logits, [1.0] * rows, [1.0] * rows, list(range(rows)), [0] * rows)
            return finish_draws(d, d.device.cpu())

        draw()
        ctx.sync()
        times = []
        for _ in range(ctx.sizes.reps):
            t0 = time.perf_counter()
            draw()
            times.append(time.perf_counter() - t0)
        out[rows] = {"s": statistics.median(times), "temperature": 1.0, "vocab": V}
    return out


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


STEPS: list[tuple[str, Callable[[Ctx], dict]]] = [
    ("expert matmuls", expert_matmuls),
    ("memory bandwidth", memory_bandwidth),
    ("launch", launch),
    ("attention backends", attention),
    ("engine single", engine_single),
    ("engine ep1", engine_ep1),
    ("decode profile", decode_profile),
    ("sampling", sampling),
    ("prefill memory", prefill_memory),
]


def _line(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {str(exc).strip().splitlines()[0] if str(exc).strip() else ''}"


def _all_ok(row: dict) -> bool:
    """False when any part of a step's record (a variant, a backend) says `ok: false`."""
    return row.get("ok", True) is not False and all(_all_ok(v) for v in row.values() if isinstance(v, dict))


def run_steps(ctx: Ctx, steps, log: Callable[[str], None]) -> dict:
    """Each step's record, with `ok`, `s` and, if it raised, `error` (its first line)."""
    results, t_start = {}, time.perf_counter()
    for name, fn in steps:
        t0 = time.perf_counter()
        try:
            row = fn(ctx)
            row = {**row, "ok": _all_ok(row)}
        except Exception as exc:
            traceback.print_exc(file=sys.stderr)
            row = {"ok": False, "error": _line(exc)}
        row["s"] = time.perf_counter() - t0
        results[name] = row
        log(f"[{time.perf_counter() - t_start:6.1f} s] {name}: {'ok' if row['ok'] else row['error']} "
            f"({row['s']:.1f} s)")
        if ctx.cuda:
            torch.cuda.empty_cache()
    return results


# ---- the profile and the summary ----
def catalogue_entry(name: str) -> tuple[str, HardwareProfile]:
    """The catalogue profile whose key appears in the device name (H100 when none does)."""
    lowered = name.lower().replace(" ", "")
    for key, profile in CATALOGUE.items():
        if key in lowered:
            return key, profile
    return "h100", CATALOGUE["h100"]


def build_profile(name: str, steps: dict, memory_bytes: float, dry_run: bool) -> HardwareProfile | None:
    """Matmul peak and curve, memory bandwidth and size, launch cost from this device; links from
    the catalogue. None when a step it needs failed."""
    needed = ("expert matmuls", "memory bandwidth", "launch")
    if not all(steps.get(n, {}).get("ok") for n in needed):
        return None
    mm, bw, ln = (steps[n] for n in needed)
    key, base = catalogue_entry(name)
    return base.with_(
        name=f"{name} (gpu_check{', dry run' if dry_run else ''})", bf16_flops=mm["fitted_peak_flops"],
        fp32_flops=mm["fp32_largest"]["flops"], hbm_bytes=float(memory_bytes), hbm_bw=bw["bandwidth"],
        gemm_peak_efficiency=1.0, gemm_half_tokens=mm["half_tokens"], hbm_efficiency=1.0,
        launch_s=ln["enqueue_s"], launch_overlaps=not dry_run,
        compute_slots=None if not dry_run else len(os.sched_getaffinity(0)),
        source=f"gpu_check: matmul, copy bandwidth and launch enqueue measured; links from catalogue '{key}'")


def simulated(ctx: Ctx, profile: HardwareProfile | None) -> dict | None:
    """The simulator's TTFT / TPOT for step 5's run from the measured profile, and what it
    assumes that the engine does not do (from step 7's profile of a decode step)."""
    if profile is None or "e2e" not in ctx.shared:
        return None
    from expertmesh.sim.scenario import Scenario
    from expertmesh.sim.simulator import simulate

    cfg, measured = ctx.shared["e2e"]
    try:
        m = simulate(Scenario(cfg, Deployment(), ctx.sizes.e2e, profile)).metrics
    except Exception as exc:  # the prediction is a bonus; never lose the measurements for it
        return {"error": _line(exc)}
    row = {"tpot_s": m.tpot_s, "ttft_s": m.ttft_s, "measured_tpot_s": measured.tpot_s,
           "assumes": "launches hidden under device work (launch_overlaps) and no host work between "
                      "kernels; a step costs its device time"}
    prof = ctx.shared.get("decode profile")
    if prof and prof.get("ok") and prof.get("kernels"):
        enqueue = prof["kernels"] * profile.launch_s
        row["engine_decode_step"] = {
            "kernels": prof["kernels"], "host_s": prof["host_s"], "device_busy_s": prof["device_busy_s"],
            "kernels_x_enqueue_s": enqueue,
            "host_bound": prof["host_s"] > (prof["device_busy_s"] or 0.0)}
    return row


def check(out_dir: Path, dry_run: bool, log: Callable[[str], None] = print,
          steps: list | None = None) -> dict:
    """Run `steps` (default: all); write gpu_check.json and profile.json under `out_dir`."""
    if not dry_run and not torch.cuda.is_available():
        raise SystemExit("no CUDA device: run on a GPU machine, or --dry-run to check the logic on CPU")
    device = torch.device("cpu") if dry_run else torch.device("cuda", 0)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    name = "CPU" if dry_run else torch.cuda.get_device_name(device)
    memory = (os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") if dry_run
              else torch.cuda.get_device_properties(device).total_memory)
    out_dir.mkdir(parents=True, exist_ok=True)
    ctx = Ctx(DRY if dry_run else GPU, device, torch.float32 if dry_run else torch.bfloat16,
              _grouped_kernel_usable(device), out_dir)
    t0 = time.perf_counter()
    results = run_steps(ctx, steps or STEPS, log)
    ctx.shared["decode profile"] = results.get("decode profile")
    record = {"device": name, "torch": torch.__version__, "dry_run": dry_run, "dtype": str(ctx.dtype),
              "grouped_mm": ctx.grouped, "sizes": asdict(ctx.sizes), "steps": results}
    profile = build_profile(name, results, memory, dry_run)
    if profile is not None:
        profile.save(out_dir / "profile.json")
        record["profile"] = asdict(profile)
    record["simulated_end_to_end"] = simulated(ctx, profile)
    record["elapsed_s"] = time.perf_counter() - t0
    (out_dir / "gpu_check.json").write_text(json.dumps(record, indent=2, default=str) + "\n")
    log(summary(record))
    return record


def _grouped_kernel_usable(device: torch.device) -> bool:
    """`torch._grouped_mm` exists and runs here (its CUDA kernel needs Hopper, sm90, or newer)."""
    if not hasattr(torch, "_grouped_mm"):
        return False
    if device.type == "cuda" and torch.cuda.get_device_capability(device) < (9, 0):
        return False
    try:
        a = torch.zeros(32, 16, dtype=torch.bfloat16, device=device)
        w = torch.zeros(2, 16, 16, dtype=torch.bfloat16, device=device)
        torch._grouped_mm(a, w, offs=torch.tensor([16, 32], dtype=torch.int32, device=device))
        return True
    except (RuntimeError, NotImplementedError):
        return False


def summary(r: dict) -> str:
    steps = r["steps"]
    lines = [f"{r['device']} (torch {r['torch']}, grouped mm {'yes' if r['grouped_mm'] else 'no: per-expert loop'})"]

    def ok(name):
        return steps.get(name, {}).get("ok")

    if ok("expert matmuls"):
        mm = steps["expert matmuls"]
        lines.append(f"expert matmuls: best {max(v['flops'] for v in mm['bf16'].values()) / 1e12:.1f} "
                     f"TFLOP/s; fitted peak {mm['fitted_peak_flops'] / 1e12:.1f}, half efficiency at "
                     f"{mm['half_tokens']:.0f} rows; fp32 {mm['fp32_largest']['flops'] / 1e12:.1f} TFLOP/s")
    if ok("memory bandwidth") and ok("launch"):
        ln = steps["launch"]
        lines.append(f"copy bandwidth {steps['memory bandwidth']['bandwidth'] / 1e9:.0f} GB/s; launch: "
                     f"enqueue {ln['enqueue_s'] * 1e6:.1f} us, tiny kernel on device "
                     f"{ln['device_s'] * 1e6:.1f} us, synchronize {ln['sync_round_trip_s'] * 1e6:.1f} us")
    if ok("attention backends"):
        for case, rows in steps["attention backends"].items():
            if isinstance(rows, dict):
                lines.append(f"attention {case}: " + "; ".join(
                    f"{n} {v['bandwidth'] / 1e9:.0f} GB/s"
                    + (f" (max |Δ| {v['max_abs_diff']:.1e}{'' if v['ok'] else ' TOO LARGE'})" if v.get("max_abs_diff") is not None else "")
                    if "bandwidth" in v else f"{n} FAILED ({v['error']})"
                    for n, v in rows.items()))
    if ok("engine single"):
        m = steps["engine single"]["metrics"]
        sim = r.get("simulated_end_to_end") or {}
        lines.append(f"engine single: TTFT {m['ttft_s'] * 1e3:.1f} ms, TPOT {m['tpot_s'] * 1e3:.2f} ms"
                     + (f" (simulated: TTFT {sim['ttft_s'] * 1e3:.1f} ms, TPOT {sim['tpot_s'] * 1e3:.2f} ms)"
                        if "tpot_s" in sim else "") + f"; sync check {steps['engine single']['sync_check']}")
    if ok("engine ep1"):
        for name, v in steps["engine ep1"].items():
            if isinstance(v, dict):
                lines.append(f"{name}: " + (f"tokens {'= single' if v['tokens_match'] else 'DIFFER from single'}, "
                                            f"max |Δlogit| {v['max_abs_logit_diff']:.2e}; sync check "
                                            f"{v['sync_check']}" if "tokens_match" in v
                                            else f"FAILED ({v['error']})"))
    if ok("decode profile"):
        p = steps["decode profile"]
        dev = f"{p['device_busy_s'] * 1e3:.2f} ms" if p["device_busy_s"] is not None else "-"
        lines.append(f"decode step: {p['kernels']} kernels, host {p['host_s'] * 1e3:.2f} ms, device busy {dev}")
        gap = (r.get("simulated_end_to_end") or {}).get("engine_decode_step")
        if gap:
            lines.append(f"the simulator hides launches under device work; this step enqueued {gap['kernels']} "
                         f"kernels x {r['profile']['launch_s'] * 1e6:.1f} us = {gap['kernels_x_enqueue_s'] * 1e3:.2f} ms "
                         f"and was {'host' if gap['host_bound'] else 'device'}-bound")
    if ok("sampling"):
        lines.append("sampling at temperature 1: " + ", ".join(
            f"{rows} rows {v['s'] * 1e3:.2f} ms" for rows, v in steps["sampling"].items() if isinstance(v, dict)))
    if ok("prefill memory"):
        p = steps["prefill memory"]
        lines.append(f"prefill of {p['tokens']} tokens, one layer: activations "
                     + (f"{p['measured_activation_bytes'] / 2**30:.2f} GiB measured, " if "measured_activation_bytes" in p else "")
                     + f"{p['simulated_activation_bytes'] / 2**30:.2f} GiB simulated (+ {p['simulated_buffer_bytes'] / 2**30:.2f} buffers)")
    failed = [n for n, v in steps.items() if not v["ok"]]
    lines.append(f"{len(steps) - len(failed)}/{len(steps)} steps ok" + (f"; failed: {', '.join(failed)}" if failed else "")
                 + f"; in {r['elapsed_s']:.0f} s")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog="\n".join(__doc__.splitlines()[2:]))
    parser.add_argument("--out", default="gpu-check", help="output folder (default: %(default)s)")
    parser.add_argument("--dry-run", action="store_true", help="tiny sizes on CPU: checks the script")
    parser.add_argument("--steps", default=None, help="comma-separated step names (default: all)")
    args = parser.parse_args(argv)
    steps = None
    if args.steps:
        wanted = [s.strip() for s in args.steps.split(",")]
        unknown = [s for s in wanted if s not in dict(STEPS)]
        if unknown:
            parser.error(f"unknown steps {unknown}; choose from {[n for n, _ in STEPS]}")
        steps = [(n, f) for n, f in STEPS if n in wanted]
    return check(Path(args.out), args.dry_run, steps=steps)


if __name__ == "__main__":
    record = main()
    sys.exit(0 if all(v["ok"] for v in record["steps"].values()) else 1)
