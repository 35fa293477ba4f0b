"""Measure one GPU on the seed model's operations and write a profile the simulator can load.

    python benchmarks/gpu_check.py --out gpu-check          # on a CUDA machine, under 8 minutes
    python benchmarks/gpu_check.py --dry-run --out /tmp/gc  # tiny sizes on CPU: checks the logic

Steps, each timed with the device synchronized (medians of a few calls after a warm-up):
  1. one expert's matmuls (up, gelu, down) at d_model 4096 / hidden 16384, bf16, for 1 .. 16384
     tokens; fp32 at the largest size: the GEMM peak and the half-efficiency row count
     (`calibrate.fit_gemm`'s curve)
  2. decode attention over a 10k-token KV cache (32 heads x 128, batch 8): the bytes of K and V
     read per step give the memory bandwidth a decode step reaches
  3. the launch overhead of one tiny op
  4. one whole `paper` decoder layer (attention + 16 experts, top-2), bf16: prefill of 2048 tokens
     and one decode step of 8 sequences against a 10k cache
  5. end to end: `single` run of `preset("paper", n_layers=2)`, batch 8, prompt 512, gen 16, and
     the simulator's prediction for it from the measured profile
  6. the parallel code paths on this one device, in a process group of world size 1 (NCCL on a
     GPU): the same model and workload as step 5 with the expert-parallel all-to-all dispatcher
     forced (ep1), and with the tensor-parallel layers applied (tp1, all-reduce hooks); each
     must give the single-device path's tokens (greedy), and its max |Δlogit| is reported

Writes DIR/profile.json (a `HardwareProfile`: `expertmesh simulate --hardware DIR/profile.json`)
and DIR/gpu_check.json (every timing). Link figures (NVLink, network) cannot be measured on one GPU
and are taken from the catalogue entry of the same GPU (H100 if the name matches none).
Runs on any torch this project supports: the grouped expert kernel is used only where
`torch._grouped_mm` exists and the GPU is Hopper or newer, else the per-expert loop.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from collections.abc import Callable
from contextlib import contextmanager, nullcontext
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from expertmesh.config import Workload, preset
from expertmesh.deployment import Deployment
from expertmesh.engine import shard
from expertmesh.engine.generate import generate
from expertmesh.engine.spec import RunSpec
from expertmesh.engine.worker import run_rank
from expertmesh.launch import free_port
from expertmesh.model.attention import Contiguous, KVCache
from expertmesh.model.synthetic import materialize
from expertmesh.model.transformer import DecoderLayer, build_model
from expertmesh.parallel.expert import apply_expert_parallel
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
    head_dim: int
    kv_len: int
    decode_batch: int
    layer_cfg: dict            # preset("paper", **layer_cfg) for steps 4 and 5
    prefill_tokens: int
    e2e: Workload
    e2e_layers: int
    reps: int


GPU = Sizes(d_model=4096, hidden=16384, token_counts=tuple(2 ** i for i in range(15)), heads=32,
            head_dim=128, kv_len=10_000, decode_batch=8, layer_cfg={}, prefill_tokens=2048,
            e2e=Workload(batch_size=8, prompt_len=512, gen_len=16), e2e_layers=2, reps=5)
DRY = Sizes(d_model=64, hidden=256, token_counts=(1, 4, 16, 64), heads=4, head_dim=16, kv_len=128,
            decode_batch=2, layer_cfg=dict(d_model=64, n_heads=4, head_dim=16, n_experts=4,
                                           expert_hidden=128, vocab_size=128, max_seq_len=256),
            prefill_tokens=32, e2e=Workload(batch_size=2, prompt_len=8, gen_len=4), e2e_layers=2,
            reps=2)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def median_time(fn: Callable[[], object], device: torch.device, reps: int) -> float:
    """Median seconds of `reps` calls after one warm-up, the device drained around each."""
    fn()
    times = []
    for _ in range(reps):
        sync(device)
        t0 = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def grouped_kernel_usable(device: torch.device) -> bool:
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


@contextmanager
def weights_hashed_on_device():
    """Make `run_rank` compute the synthetic weights on its device itself: the hash is
    elementwise int32 arithmetic, identical on CPU and CUDA, and hashing the paper layer's 2.2 B
    weights on the host takes minutes."""
    original = shard.materialize

    def on_device(model, seed, dtype, dev="cpu"):
        with torch.device(dev):
            return original(model, seed, dtype, dev)

    shard.materialize = on_device
    try:
        yield
    finally:
        shard.materialize = original


def expert_matmuls(sizes: Sizes, device: torch.device, dtype: torch.dtype) -> dict:
    """FLOP/s of one expert (up -> gelu -> down) per token count; fp32 at the largest count."""
    gen = torch.Generator().manual_seed(0)
    w_up = (torch.randn(sizes.hidden, sizes.d_model, generator=gen) / sizes.d_model ** 0.5).to(device, dtype)
    w_down = (torch.randn(sizes.d_model, sizes.hidden, generator=gen) / sizes.hidden ** 0.5).to(device, dtype)
    rows = {}
    for tokens in sizes.token_counts:
        x = torch.randn(tokens, sizes.d_model, generator=gen).to(device, dtype)
        t = median_time(lambda: F.linear(F.gelu(F.linear(x, w_up)), w_down), device, sizes.reps)
        rows[tokens] = {"s": t, "flops": 2 * 2 * tokens * sizes.d_model * sizes.hidden / t}
    big = max(sizes.token_counts)
    x32 = torch.randn(big, sizes.d_model, generator=gen).to(device)
    up32, down32 = w_up.float(), w_down.float()
    t32 = median_time(lambda: F.linear(F.gelu(F.linear(x32, up32)), down32), device, sizes.reps)
    return {"bf16": rows, "fp32_largest": {"tokens": big, "s": t32,
                                            "flops": 2 * 2 * big * sizes.d_model * sizes.hidden / t32}}


def decode_attention(sizes: Sizes, device: torch.device, dtype: torch.dtype) -> dict:
    """One new query per sequence against a `kv_len` cache: bytes of K and V read / time."""
    b, h, d, S = sizes.decode_batch, sizes.heads, sizes.head_dim, sizes.kv_len
    q = torch.randn(b, h, 1, d, device=device, dtype=dtype)
    k = torch.randn(b, h, S, d, device=device, dtype=dtype)
    v = torch.randn_like(k)
    t = median_time(lambda: F.scaled_dot_product_attention(q, k, v), device, sizes.reps)
    return {"s": t, "bytes": k.nbytes + v.nbytes, "bandwidth": (k.nbytes + v.nbytes) / t,
            "batch": b, "heads": h, "head_dim": d, "kv_len": S}


def launch_overhead(device: torch.device, n: int = 200) -> float:
    """Seconds per tiny op when issued back to back (a CPU adds its op overhead instead)."""
    x = torch.zeros(1, device=device)
    sync(device)
    t0 = time.perf_counter()
    for _ in range(n):
        x.add_(1)
    sync(device)
    return (time.perf_counter() - t0) / n


def paper_layer(sizes: Sizes, device: torch.device, dtype: torch.dtype, grouped: bool) -> dict:
    """A whole `paper` decoder layer on `device`: prefill of `prefill_tokens`, one decode step."""
    cfg = preset("paper", **sizes.layer_cfg)
    t_build = time.perf_counter()
    with torch.device("meta"):
        layer = DecoderLayer(cfg)
    with torch.device(device):  # hash on the device (see `weights_hashed_on_device`)
        layer = materialize(layer, 0, dtype, device)
    t_build = time.perf_counter() - t_build
    gen = torch.Generator().manual_seed(1)
    loop = nullcontext() if grouped else per_expert_loop()
    out = {"build_s": t_build, "grouped_mm": grouped}
    with torch.inference_mode(), loop:
        x = torch.randn(1, sizes.prefill_tokens, cfg.d_model, generator=gen).to(device, dtype)
        out["prefill_s"] = median_time(lambda: layer(x, Contiguous(None)), device, sizes.reps)
        out["prefill_tokens"] = sizes.prefill_tokens
        cache = KVCache(sizes.decode_batch, sizes.kv_len + 1, cfg.n_kv_heads, cfg.head_dim, dtype, device)
        step = torch.randn(sizes.decode_batch, 1, cfg.d_model, generator=gen).to(device, dtype)
        at_kv_len = Contiguous(cache, slice(None), sizes.kv_len)
        out["decode_step_s"] = median_time(lambda: layer(step, at_kv_len), device, sizes.reps)
        out["decode_batch"], out["kv_len"] = sizes.decode_batch, sizes.kv_len
    del layer
    return out


def end_to_end(sizes: Sizes, device: torch.device, dtype: str, grouped: bool) -> tuple[dict, object]:
    cfg = preset("paper", n_layers=sizes.e2e_layers, dtype=dtype, **sizes.layer_cfg)
    spec = RunSpec(cfg, Deployment.parse("single"), sizes.e2e)
    spec.validate(1)
    t0 = time.perf_counter()
    with weights_hashed_on_device(), nullcontext() if grouped else per_expert_loop():
        result = run_rank(spec, device)
    m = result.metrics
    return {"wall_s": time.perf_counter() - t0, "model": cfg.to_dict(),
            "workload": {"batch": sizes.e2e.batch_size, "prompt": sizes.e2e.prompt_len,
                         "gen": sizes.e2e.gen_len},
            "metrics": m.to_dict()}, cfg


def parallel_paths(sizes: Sizes, device: torch.device, dtype: str, grouped: bool) -> dict:
    """Tokens and logits of the ep1 (all-to-all dispatcher) and tp1 paths against `single`."""
    import torch.distributed as dist

    cfg = preset("paper", n_layers=sizes.e2e_layers, dtype=dtype, **sizes.layer_cfg)
    backend = "nccl" if device.type == "cuda" else "gloo"
    dist.init_process_group(backend, init_method=f"tcp://127.0.0.1:{free_port()}", rank=0, world_size=1,
                            device_id=device if device.type == "cuda" else None)
    group = dist.group.WORLD
    transforms = {
        "single": lambda m: m,
        "ep1 (all-to-all dispatcher)": lambda m: apply_expert_parallel(
            m, group, 0, default_placement(cfg.n_layers, cfg.n_experts, 1)),
        "tp1 (tensor-parallel layers)": lambda m: apply_tensor_parallel(m, group, 1, 0),
    }
    prompts = sizes.e2e.prompts(cfg)
    rows = list(range(sizes.e2e.batch_size))
    out = {}
    try:
        with weights_hashed_on_device(), nullcontext() if grouped else per_expert_loop():
            for name, transform in transforms.items():
                model = shard.materialize(transform(build_model(cfg)), 0, cfg.torch_dtype, device)
                t0 = time.perf_counter()
                gen = generate(model, sizes.e2e, prompts, rows, record_logits=True)
                out[name] = {"wall_s": time.perf_counter() - t0, "tokens": gen.tokens, "logits": gen.logits}
                del model
    finally:
        dist.destroy_process_group()
    reference = out["single"]
    return {name: {"wall_s": r["wall_s"], "tokens_match": bool(torch.equal(r["tokens"], reference["tokens"])),
                   "max_abs_logit_diff": (r["logits"] - reference["logits"]).abs().max().item()}
            for name, r in out.items()}


def catalogue_entry(name: str) -> tuple[str, HardwareProfile]:
    """The catalogue profile whose key appears in the device name (H100 when none does)."""
    lowered = name.lower().replace(" ", "")
    for key, profile in CATALOGUE.items():
        if key in lowered:
            return key, profile
    return "h100", CATALOGUE["h100"]


def build_profile(name: str, matmuls: dict, attention: dict, launch_s: float,
                  memory_bytes: float, dry_run: bool) -> HardwareProfile:
    """The fields `calibrate` fills, from this device's measurements: matmul peak and its curve,
    memory bandwidth and size, launch overhead; links from the catalogue (one device only)."""
    peak, half = fit_gemm({t: r["flops"] for t, r in matmuls["bf16"].items()})
    key, base = catalogue_entry(name)
    return base.with_(
        name=f"{name} (gpu_check{', dry run' if dry_run else ''})", bf16_flops=peak,
        fp32_flops=matmuls["fp32_largest"]["flops"], hbm_bytes=float(memory_bytes),
        hbm_bw=attention["bandwidth"], gemm_peak_efficiency=1.0, gemm_half_tokens=half,
        hbm_efficiency=1.0, launch_s=launch_s, launch_overlaps=not dry_run,
        compute_slots=None if not dry_run else len(os.sched_getaffinity(0)),
        source=f"gpu_check: matmul, bandwidth and launch measured; links from catalogue '{key}'")


def predicted(cfg, workload: Workload, profile: HardwareProfile) -> dict | None:
    """The simulator's TPOT / TTFT for the end-to-end run, from the measured profile."""
    try:
        from expertmesh.sim.scenario import Scenario
        from expertmesh.sim.simulator import simulate

        m = simulate(Scenario(cfg, Deployment(), workload, profile)).metrics
        return {"tpot_s": m.tpot_s, "ttft_s": m.ttft_s}
    except Exception as exc:  # the prediction is a bonus; never lose the measurements for it
        return {"error": f"{type(exc).__name__}: {exc}"}


def check(out_dir: Path, dry_run: bool, log: Callable[[str], None] = print) -> dict:
    """Run every step; write profile.json and gpu_check.json under `out_dir`; return the record."""
    if not dry_run and not torch.cuda.is_available():
        raise SystemExit("no CUDA device: run on a GPU machine, or --dry-run to check the logic on CPU")
    s = DRY if dry_run else GPU
    device = torch.device("cpu") if dry_run else torch.device("cuda", 0)
    dtype = torch.float32 if dry_run else torch.bfloat16
    name = "CPU" if dry_run else torch.cuda.get_device_name(device)
    memory = (os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") if dry_run
              else torch.cuda.get_device_properties(device).total_memory)
    out_dir.mkdir(parents=True, exist_ok=True)
    grouped = grouped_kernel_usable(device)
    record = {"device": name, "torch": torch.__version__, "dry_run": dry_run, "sizes": asdict(s),
              "dtype": str(dtype),
              "grouped_mm": grouped}
    t0 = time.perf_counter()

    def step(label: str, fn: Callable[[], object]):
        t = time.perf_counter()
        value = fn()
        log(f"[{time.perf_counter() - t0:6.1f} s] {label}: {time.perf_counter() - t:.1f} s")
        return value

    record["expert_matmuls"] = step("expert matmuls", lambda: expert_matmuls(s, device, dtype))
    record["decode_attention"] = step("decode attention", lambda: decode_attention(s, device, dtype))
    record["launch_s"] = step("launch overhead", lambda: launch_overhead(device))
    profile = build_profile(name, record["expert_matmuls"], record["decode_attention"],
                            record["launch_s"], memory, dry_run)
    profile.save(out_dir / "profile.json")
    record["paper_layer"] = step("paper layer", lambda: paper_layer(s, device, dtype, grouped))
    if device.type == "cuda":
        torch.cuda.empty_cache()
    e2e, cfg = step("end to end", lambda: end_to_end(s, device, "fp32" if dry_run else "bf16", grouped))
    record["end_to_end"] = e2e
    record["end_to_end"]["simulated"] = predicted(cfg, s.e2e, profile)
    record["parallel_paths"] = step("parallel paths", lambda: parallel_paths(
        s, device, "fp32" if dry_run else "bf16", grouped))
    record["profile"] = asdict(profile)
    record["elapsed_s"] = time.perf_counter() - t0
    (out_dir / "gpu_check.json").write_text(json.dumps(record, indent=2, default=str) + "\n")
    log(summary(record))
    return record


def summary(r: dict) -> str:
    p, mm = r["profile"], r["expert_matmuls"]["bf16"]
    best = max(v["flops"] for v in mm.values())
    e2e = r["end_to_end"]["metrics"]
    sim = r["end_to_end"].get("simulated") or {}
    lines = [
        f"{r['device']} (torch {r['torch']}, grouped mm {'yes' if r['grouped_mm'] else 'no: per-expert loop'})",
        f"expert matmuls: best {best / 1e12:.1f} TFLOP/s; fitted peak {p['bf16_flops'] / 1e12:.1f}, "
        f"half efficiency at {p['gemm_half_tokens']:.0f} tokens; fp32 "
        f"{p['fp32_flops'] / 1e12:.1f} TFLOP/s",
        f"decode attention: {r['decode_attention']['bandwidth'] / 1e9:.0f} GB/s; launch "
        f"{r['launch_s'] * 1e6:.1f} us",
        f"paper layer: prefill {r['paper_layer']['prefill_tokens']} tokens "
        f"{r['paper_layer']['prefill_s'] * 1e3:.1f} ms, decode step {r['paper_layer']['decode_step_s'] * 1e3:.2f} ms",
        f"end to end: TTFT {e2e['ttft_s'] * 1e3:.1f} ms, TPOT {e2e['tpot_s'] * 1e3:.2f} ms"
        + (f" (simulated from this profile: TTFT {sim['ttft_s'] * 1e3:.1f} ms, TPOT {sim['tpot_s'] * 1e3:.2f} ms)"
           if "tpot_s" in sim else ""),
        *(f"{name}: tokens {'= single' if p['tokens_match'] else 'DIFFER from single'}, max |Δlogit| "
          f"{p['max_abs_logit_diff']:.2e}" for name, p in r["parallel_paths"].items() if name != "single"),
        f"in {r['elapsed_s']:.0f} s",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog="\n".join(__doc__.splitlines()[2:]))
    parser.add_argument("--out", default="gpu-check", help="output folder (default: %(default)s)")
    parser.add_argument("--dry-run", action="store_true", help="tiny sizes on CPU: checks the script")
    args = parser.parse_args(argv)
    return check(Path(args.out), args.dry_run)


if __name__ == "__main__":
    sys.exit(0 if main() else 1)
