"""Predict real CPU runs of the engine that the calibration never saw, run them, compare.

    python benchmarks/sim_vs_real.py [--profile profile.json] [--quick] [--repeat N] [--json out.json]

Protocol: the machine is measured into a profile (`expertmesh calibrate`: matmuls, memory
bandwidth, gloo collectives; or --profile). Four engine-level constants, the per-op framework
overhead (`launch_s`), the host time of an engine step outside its forward (`step_host_s`), a
scale on the microbenchmark's matmul rate and the ranks' worth of cores the engine's ranks get
at once (`compute_slots`), are then fitted to a *calibration* set of real runs
(deployments `single`, `ep2`, at two workloads), by least squares on their relative TTFT and TPOT
errors. The
profile then predicts a *held-out* set: other deployments (`tp2`, `pp2`, `ep2pp2` ... ) at another
batch and prompt length, none of which informed any constant. Each deployment runs as local gloo
ranks (expertmesh.launch), one thread per rank, the tiny preset in fp32, `--repeat` times, the
runs of all deployments of both sets in turn, round after round; the fastest run stands for it
(the least disturbed by other load, as calibrate's own timings).
Prints both sets with their errors and the held-out median and worst relative error.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import statistics
import sys

import numpy as np
from rich.console import Console
from rich.table import Table

from expertmesh.config import Workload, preset
from expertmesh.deployment import Deployment
from expertmesh.engine.spec import RunSpec
from expertmesh.engine.worker import run_rank
from expertmesh.launch import launch
from expertmesh.sim.calibrate import calibrate
from expertmesh.sim.hardware import HardwareProfile
from expertmesh.sim.scenario import Scenario
from expertmesh.sim.simulator import simulate

CALIBRATE_ON = ("single", "ep2")
HELD_OUT = ("ep2", "tp2", "pp2", "ep4")
METRICS = ("ttft_s", "tpot_s")
WORKLOADS = {  # (calibration workloads, held-out): no held-out batch or prompt is calibrated on
    "quick": ((Workload(batch_size=4, prompt_len=16, gen_len=4), Workload(batch_size=1, prompt_len=24, gen_len=6)),
              Workload(batch_size=2, prompt_len=32, gen_len=5)),
    "full": ((Workload(batch_size=8, prompt_len=64, gen_len=16), Workload(batch_size=2, prompt_len=96, gen_len=8)),
             Workload(batch_size=4, prompt_len=128, gen_len=12)),
}


def measure(name: str, workload: Workload, repeat: int) -> dict[str, float]:
    """Fastest TTFT and TPOT of `repeat` real runs of deployment `name`."""
    cfg, dep = preset("tiny"), Deployment.parse(name)
    spec = RunSpec(cfg, dep, workload)
    spec.validate(dep.world_size)
    runs = [launch(functools.partial(run_rank, spec), dep.world_size).metrics for _ in range(repeat)]
    return {m: min(getattr(r, m) for r in runs) for m in METRICS}


def predict(profile: HardwareProfile, name: str, workload: Workload) -> dict[str, float]:
    dep = Deployment.parse(name)
    metrics = simulate(Scenario(preset("tiny"), dep, workload, profile, gpus_per_node=dep.world_size)).metrics
    return {m: getattr(metrics, m) for m in METRICS}


COMPUTE_SCALES = tuple(2 ** (i / 4) for i in range(-4, 13))  # 0.5x .. 8x the microbenchmark's time
COMPUTE_SLOTS = tuple(1.0 + i / 10 for i in range(11))  # 1 .. 2 ranks' worth of cores, at most the profile's


ENGINE_CONSTANTS = ("launch_s", "step_host_s")


def _engine_constants(profile: HardwareProfile, runs) -> tuple[dict[str, float], float]:
    """The per-op overhead `launch_s` and the per-step host time `step_host_s` minimising the
    squared relative error over `runs` for this profile, both >= 0 (and that error). On a CPU
    profile every op's launch adds to its time and every step's host work to the step, so each
    prediction is linear in both."""
    unit = 1e-3
    zero = profile.with_(**dict.fromkeys(ENGINE_CONSTANTS, 0.0))
    rows = []  # (prediction at zero, slope per constant, measured)
    for name, workload, measured in runs:
        t0 = predict(zero, name, workload)
        slopes = [predict(zero.with_(**{c: unit}), name, workload) for c in ENGINE_CONSTANTS]
        rows += [(t0[m], [(t[m] - t0[m]) / unit for t in slopes], measured[m]) for m in METRICS]
    A = np.array([[a / y for a in slope] for _, slope, y in rows])
    b = np.array([(y - p) / y for p, _, y in rows])
    best = None
    for free in ([0, 1], [0], [1], []):  # non-negative least squares over two unknowns
        x = np.zeros(2)
        if free:
            x[free] = np.linalg.lstsq(A[:, free], b, rcond=None)[0]
        if (x >= 0).all():
            err = float(((A @ x - b) ** 2).sum())
            if best is None or err < best[1]:
                best = (x, err)
    x, err = best
    return dict(zip(ENGINE_CONSTANTS, map(float, x))), err


def fit_profile(profile: HardwareProfile, runs) -> HardwareProfile:
    """The profile's engine-level constants fitted to the calibration runs: the per-op overhead
    `launch_s`, the host time of an engine step outside its forward `step_host_s` (scheduling,
    the control messages' serialisation; their latency is costed from the measured gloo
    latency), how much slower the engine's matmuls run than the microbenchmark's (other shapes,
    caches), as one scale on the matmul peaks, and how many ranks' compute the cores give at
    once while the engine runs (`compute_slots`: other processes, and gloo's own threads, take
    cores from the ranks; `single` against `ep2` tells), searched over COMPUTE_SCALES x
    COMPUTE_SLOTS with the best launch_s and step_host_s for each."""
    def scaled(scale: float, slots: float) -> HardwareProfile:
        return profile.with_(bf16_flops=profile.bf16_flops / scale, compute_slots=slots,
                             fp32_flops=profile.fp32_flops / scale if profile.fp32_flops else None)

    cores = profile.compute_slots or 1.0
    slots = sorted({min(s, cores) for s in COMPUTE_SLOTS})
    fits = [(_engine_constants(scaled(scale, n), runs), scale, n) for scale in COMPUTE_SCALES for n in slots]
    (constants, _), scale, n = min(fits, key=lambda f: f[0][1])
    return scaled(scale, n).with_(**constants)


def rows_for(profile: HardwareProfile, runs, kind: str) -> list[dict]:
    out = []
    for name, workload, measured in runs:
        predicted = predict(profile, name, workload)
        for m in METRICS:
            p, t = predicted[m], measured[m]
            out.append({"set": kind, "deployment": name, "batch": workload.batch_size,
                        "prompt": workload.prompt_len, "metric": m[:-2], "predicted_s": p,
                        "measured_s": t, "abs_error_s": abs(p - t), "rel_error": abs(p - t) / t})
    return out


def compare(profile: HardwareProfile, calibration: tuple[Workload, ...], held_out: Workload, repeat: int,
            held_out_deployments=HELD_OUT) -> tuple[HardwareProfile, list[dict]]:
    """Fit on the calibration runs (each calibration deployment at each calibration workload:
    8 figures for 4 constants), predict the held-out ones: (fitted profile, rows of both). The
    runs of both sets are interleaved, round after round, so that a change of the machine's
    load touches both sets alike; each keeps its fastest run."""
    cal_plan = [(n, w) for w in calibration for n in CALIBRATE_ON]
    plan = cal_plan + [(n, held_out) for n in held_out_deployments]
    rounds = [[measure(n, w, 1) for n, w in plan] for _ in range(repeat)]
    best = [{m: min(r[i][m] for r in rounds) for m in METRICS} for i in range(len(plan))]
    runs = [(n, w, b) for (n, w), b in zip(plan, best)]
    cal, held = runs[:len(cal_plan)], runs[len(cal_plan):]
    fitted = fit_profile(profile, cal)
    return fitted, rows_for(fitted, cal, "calibration") + rows_for(fitted, held, "held-out")


def summary(rows: list[dict]) -> dict:
    held = [r for r in rows if r["set"] == "held-out"]
    rel = [r["rel_error"] for r in held]
    ratios = [max(r["predicted_s"] / r["measured_s"], r["measured_s"] / r["predicted_s"]) for r in held]
    return {"held_out_rows": len(held), "median_rel_error": statistics.median(rel),
            "worst_rel_error": max(rel), "worst_ratio": max(ratios),
            "median_abs_error_s": statistics.median(r["abs_error_s"] for r in held)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--profile", help="a profile from `expertmesh calibrate` (default: calibrate now)")
    parser.add_argument("--quick", action="store_true", help="small workloads and a quick calibration")
    parser.add_argument("--repeat", type=int, default=3, help="runs per deployment; the fastest counts")
    parser.add_argument("--held-out", default=",".join(HELD_OUT), help="deployments to predict")
    parser.add_argument("--json", help="write the rows and the summary here")
    args = parser.parse_args(argv)
    if args.repeat < 1:
        parser.error(f"--repeat {args.repeat} must be at least 1")

    held_out_deployments = tuple(args.held_out.split(","))
    max_ranks = max(Deployment.parse(d).world_size for d in held_out_deployments + CALIBRATE_ON)
    if args.profile:
        profile = HardwareProfile.load(args.profile)
    else:
        profile = calibrate(max_ranks=max(max_ranks, 2), repeat=2 if args.quick else 5)
    calibration, held_out = WORKLOADS["quick" if args.quick else "full"]
    fitted, rows = compare(profile, calibration, held_out, args.repeat, held_out_deployments)
    stats = summary(rows)

    scale = profile.fp32_flops / fitted.fp32_flops
    table = Table(title=f"simulated vs measured, tiny fp32, {fitted.name}; fitted on the calibration "
                        f"set: launch_s {fitted.launch_s * 1e6:.0f} us, step_host_s {fitted.step_host_s * 1e3:.2f} ms, "
                        f"{fitted.compute_slots:.1f} ranks compute at once, matmuls {scale:.2f}x slower "
                        f"than the microbenchmark")
    for col in ("set", "deployment", "batch x prompt", "metric", "predicted ms", "measured ms", "error %"):
        table.add_column(col, justify="left" if col in ("set", "deployment", "metric") else "right")
    for r in rows:
        table.add_row(r["set"], r["deployment"], f"{r['batch']} x {r['prompt']}", r["metric"],
                      f"{r['predicted_s'] * 1e3:.2f}", f"{r['measured_s'] * 1e3:.2f}",
                      f"{r['rel_error'] * 100:.0f}")
    console = Console()
    console.print(table)
    console.print(f"held-out: median error {stats['median_rel_error'] * 100:.0f}% "
                  f"({stats['median_abs_error_s'] * 1e3:.2f} ms), worst {stats['worst_rel_error'] * 100:.0f}% "
                  f"(ratio {stats['worst_ratio']:.2f}x), over {stats['held_out_rows']} predictions")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"rows": rows, "summary": stats, "profile": dataclasses.asdict(fitted)}, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
