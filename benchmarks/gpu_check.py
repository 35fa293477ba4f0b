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
import json
import os
import sys
import time
import traceback
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path

import torch

from expertmesh.deployment import Deployment
from expertmesh.sim.hardware import CATALOGUE, HardwareProfile

try:  # imported from the `benchmarks` package (tests) or run as a script
    from .gpu_device_steps import (DRY, GPU, Ctx, _line, attention, attention_backends,  # noqa: F401
                                   expert_matmuls, launch, memory_bandwidth, sampling)
    from .gpu_engine_steps import (decode_profile, engine_ep1, engine_single,  # noqa: F401
                                   no_host_sync_in_decode_forwards, prefill_memory)
except ImportError:
    from gpu_device_steps import (DRY, GPU, Ctx, _line, attention, attention_backends,  # noqa: F401
                                  expert_matmuls, launch, memory_bandwidth, sampling)
    from gpu_engine_steps import (decode_profile, engine_ep1, engine_single,  # noqa: F401
                                  no_host_sync_in_decode_forwards, prefill_memory)


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
        verdict = "ok" if row["ok"] else row.get("error") or "failed: " + ", ".join(
            k for k, v in row.items() if isinstance(v, dict) and not _all_ok(v))
        log(f"[{time.perf_counter() - t_start:6.1f} s] {name}: {verdict} "
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
