"""gpu_check's steps that measure the device and its kernels (1-4, 8 of `gpu_check.py`'s list),
and what every step shares: the sizes (`GPU`, `DRY`), the context `Ctx`, and `device_time`."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from expertmesh.config import Workload, preset
from expertmesh.engine.sampling import sample_requests
from expertmesh.model.paged import KVPool, PagedBatch, PagedView
from expertmesh.sim.calibrate import fit_gemm


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
    """Host enqueue per tiny kernel (what launches cost the host), the stream's time per tiny
    kernel issued back to back (`device_s`: the larger of its run time and the enqueue rate), and
    a synchronize's round trip; the warm-up loads the kernel (CUDA loads modules lazily: the
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


def sampling(ctx: Ctx) -> dict:
    V, out = ctx.cfg().vocab_size, {}
    for rows in ctx.sizes.sample_rows:
        logits = torch.randn(rows, V, device=ctx.device, dtype=torch.float32)

        def draw():  # the engine's device sampling, then the one read of the ids
            return sample_requests(logits, [1.0] * rows, [1.0] * rows, [0] * rows,
                                   list(range(rows)), [0] * rows).tolist()

        draw()
        ctx.sync()
        times = []
        for _ in range(ctx.sizes.reps):
            t0 = time.perf_counter()
            draw()
            times.append(time.perf_counter() - t0)
        out[rows] = {"s": statistics.median(times), "temperature": 1.0, "vocab": V}
    return out


def _line(exc: BaseException) -> str:
    """An exception as one line: its type and its message's first line."""
    return f"{type(exc).__name__}: {str(exc).strip().splitlines()[0] if str(exc).strip() else ''}"
