"""Predict real CPU runs of the engine with a calibrated profile, run them, compare.

    python benchmarks/sim_vs_real.py [--profile profile.json] [--quick] [--json out.json]

Without --profile the machine is calibrated first. Each deployment runs as local gloo ranks
(expertmesh.launch), one thread per rank, the tiny preset in fp32; the simulator predicts the
same plan with the profile. Prints predicted vs measured TTFT and TPOT and the median / worst
absolute and relative errors over all of them.
"""

from __future__ import annotations

import argparse
import functools
import json
import statistics
import sys

from rich.console import Console
from rich.table import Table

from expertmesh.config import Workload, preset
from expertmesh.deployment import Deployment
from expertmesh.engine.worker import RunSpec, run_rank
from expertmesh.launch import launch
from expertmesh.sim.calibrate import calibrate
from expertmesh.sim.hardware import HardwareProfile
from expertmesh.sim.scenario import Scenario
from expertmesh.sim.simulator import simulate

DEPLOYMENTS = ("single", "ep2", "tp2", "pp2", "ep4", "tp2pp2")


def compare(profile: HardwareProfile, deployments, workload: Workload) -> list[dict]:
    """One row per deployment and metric: predicted and measured seconds."""
    cfg = preset("tiny")
    rows = []
    for name in deployments:
        dep = Deployment.parse(name)
        spec = RunSpec(cfg, dep, workload)
        spec.validate(dep.world_size)
        measured = launch(functools.partial(run_rank, spec), dep.world_size).metrics
        predicted = simulate(Scenario(cfg, dep, workload, profile, gpus_per_node=dep.world_size)).metrics
        for metric in ("ttft_s", "tpot_s"):
            p, m = getattr(predicted, metric), getattr(measured, metric)
            rows.append({"deployment": name, "metric": metric[:-2], "predicted_s": p,
                         "measured_s": m, "abs_error_s": abs(p - m), "rel_error": abs(p - m) / m})
    return rows


def summary(rows: list[dict]) -> dict:
    abs_err = [r["abs_error_s"] for r in rows]
    rel_err = [r["rel_error"] for r in rows]
    return {"median_abs_error_s": statistics.median(abs_err), "worst_abs_error_s": max(abs_err),
            "median_rel_error": statistics.median(rel_err), "worst_rel_error": max(rel_err)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--profile", help="a profile from `expertmesh calibrate` (default: calibrate now)")
    parser.add_argument("--quick", action="store_true", help="a small workload and quick calibration")
    parser.add_argument("--deployments", default=",".join(DEPLOYMENTS))
    parser.add_argument("--json", help="write the rows and the summary here")
    args = parser.parse_args(argv)

    deployments = args.deployments.split(",")
    max_ranks = max(Deployment.parse(d).world_size for d in deployments)
    if args.profile:
        profile = HardwareProfile.load(args.profile)
    else:
        profile = calibrate(max_ranks=max(max_ranks, 2), repeat=2 if args.quick else 5)
    workload = (Workload(batch_size=4, prompt_len=16, gen_len=4) if args.quick
                else Workload(batch_size=8, prompt_len=64, gen_len=16))
    rows = compare(profile, deployments, workload)
    stats = summary(rows)

    table = Table(title=f"simulated vs measured, tiny fp32, batch {workload.batch_size}, "
                        f"prompt {workload.prompt_len}, generate {workload.gen_len}, {profile.name}")
    for col in ("deployment", "metric", "predicted ms", "measured ms", "error ms", "error %"):
        table.add_column(col, justify="left" if col in ("deployment", "metric") else "right")
    for r in rows:
        table.add_row(r["deployment"], r["metric"], f"{r['predicted_s'] * 1e3:.2f}",
                      f"{r['measured_s'] * 1e3:.2f}", f"{r['abs_error_s'] * 1e3:.2f}",
                      f"{r['rel_error'] * 100:.0f}")
    console = Console()
    console.print(table)
    console.print(f"median error {stats['median_abs_error_s'] * 1e3:.2f} ms "
                  f"({stats['median_rel_error'] * 100:.0f}%), worst {stats['worst_abs_error_s'] * 1e3:.2f} ms "
                  f"({stats['worst_rel_error'] * 100:.0f}%)")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"rows": rows, "summary": stats}, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
