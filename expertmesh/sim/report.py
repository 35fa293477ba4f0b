"""Printing and plotting simulated runs: the seed-shaped table, assumptions, the sweep plots."""

from __future__ import annotations

import dataclasses
import sys
from pathlib import Path

from rich.console import Console
from rich.table import Table

from expertmesh.deployment import Deployment
from expertmesh.sim.scenario import Scenario
from expertmesh.sim.simulator import SimResult, simulate

SWEEP_GPUS = (16, 32, 64, 128, 256)
SWEEP_FAMILIES = {"EP": "ep16", "TPxPP": "tp8pp2", "mixed EP x PP": "ep8pp2"}


def console() -> Console:
    """A console wide enough for the results table when output is not a terminal (logs, files)."""
    return Console() if sys.stdout.isatty() else Console(width=220)


def ms(seconds: float | None) -> str:
    return "-" if seconds is None else f"{seconds * 1e3:,.2f}"


def results_table(results: list[SimResult], title: str) -> Table:
    table = Table(title=title)
    for col in ("method", "GPUs", "per-GPU deployment", "TPS overall", "TPS decode", "TPOT ms",
                "TPOT bound ms", "TTFT ms", "TTFT bound ms", "memory/GPU GB", "busiest"):
        table.add_column(col, justify="left" if col in ("method", "per-GPU deployment", "busiest") else "right")
    for r in results:
        sc, m, b, mem = r.scenario, r.metrics, r.bound, r.memory
        method = sc.deployment.name + (f" x{sc.replicas} replicas" if sc.replicas > 1 else "")
        fit = r.fits  # a deployment that does not fit gets no figures, only its memory
        table.add_row(
            method, str(sc.gpus), sc.deployment.describe(sc.cfg.n_experts),
            f"{m.overall_tps:,.0f}" if fit else "-",
            f"{m.decode_tps:,.0f}" if fit and m.decode_tps else "-", ms(m.tpot_s) if fit else "-",
            f"{ms(b.tpot_s)} ({b.tpot_resource})" if b.tpot_s else "-", ms(m.ttft_s) if fit else "-",
            f"{ms(b.ttft_s)} ({b.ttft_resource})",
            f"{mem.total_bytes / 1e9:,.1f}" + ("" if fit else f" > {mem.capacity_bytes / 1e9:.0f}: DOES NOT FIT"),
            f"{r.busiest} {r.busiest_fraction:.0%}" if fit else "-")
    return table


def print_assumptions(console: Console, scenarios: list[Scenario] | Scenario) -> None:
    """Every assumption of every scenario shown: shared ones once, the rest per deployment."""
    scenarios = scenarios if isinstance(scenarios, list) else [scenarios]
    per = [sc.assumptions() for sc in scenarios]
    for key in per[0]:
        texts = [a[key] for a in per]
        if len(set(texts)) == 1:
            console.print(f"  [bold]{key}[/bold]: {texts[0]}")
            continue
        for sc, text in zip(scenarios, texts):
            console.print(f"  [bold]{key}[/bold] ({sc.deployment.name}, {sc.gpus} GPUs): {text}")
    console.print("  [bold]metrics[/bold]: TPS overall = batch x (prompt + generated) / run time; "
                  "TPS decode = batch x (generated - 1) / decode time; TPOT, TTFT as engine/metrics.py")


def sweep(base: Scenario, gpu_counts=SWEEP_GPUS, families=None) -> dict[str, list[SimResult]]:
    """Each family's deployment, replicated over each GPU count (skipped where it does not divide)."""
    out = {}
    for label, name in (families or SWEEP_FAMILIES).items():
        dep = Deployment.parse(name)
        out[label] = [simulate(dataclasses.replace(base, deployment=dep, gpus=n))
                      for n in gpu_counts if n % dep.world_size == 0
                      and base.workload.batch_size >= n // dep.world_size]
    return out


def plot_sweep(curves: dict[str, list[SimResult]], out_dir: str | Path) -> list[Path]:
    """Write tps.png and tpot.png (overall TPS and TPOT against GPU count) into `out_dir`."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as exc:
        raise RuntimeError("plots need matplotlib; install it with `pip install expertmesh[plot]`") from exc
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for key, label, value in (("tps", "overall TPS (tokens/s)", lambda r: r.metrics.overall_tps),
                              ("tpot", "TPOT (ms)", lambda r: r.metrics.tpot_s * 1e3)):
        fig, ax = plt.subplots(figsize=(6, 4))
        for family, results in curves.items():
            name = results[0].scenario.deployment.name if results else ""
            ax.plot([r.scenario.gpus for r in results], [value(r) for r in results], marker="o",
                    label=f"{family} ({name} replicas)")
        ax.set_xscale("log", base=2)
        ax.set_xlabel("GPUs")
        ax.set_ylabel(label)
        ax.legend()
        ax.grid(True, alpha=0.3)
        path = out / f"{key}.png"
        fig.tight_layout()
        fig.savefig(path, dpi=120)
        plt.close(fig)
        paths.append(path)
    return paths
