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
                "TPOT bound ms", "TTFT ms", "TTFT bound ms", "memory/GPU GB", "dominant cost"):
        table.add_column(col, justify="left" if col in ("method", "per-GPU deployment", "dominant cost") else "right")
    for r in results:
        sc, m, b, mem = r.scenario, r.metrics, r.bound, r.memory
        method = sc.name + (f" x{sc.replicas} replicas" if sc.replicas > 1 else "")
        fit = r.fits  # a deployment that does not fit gets no figures, only its memory
        table.add_row(
            method, str(sc.gpus), sc.deployment.describe(sc.cfg.n_experts),
            f"{m.overall_tps:,.0f}" if fit else "-",
            f"{m.decode_tps:,.0f}" if fit and m.decode_tps else "-", ms(m.tpot_s) if fit else "-",
            f"{ms(b.tpot_s)} ({b.tpot_resource})" if b.tpot_s else "-", ms(m.ttft_s) if fit else "-",
            f"{ms(b.ttft_s)} ({b.ttft_resource})",
            f"{mem.total_bytes / 1e9:,.1f}" + ("" if fit else f" > {mem.capacity_bytes / 1e9:.0f}: DOES NOT FIT"),
            dominant(r) if fit else "-")
    return table


def dominant(r: SimResult) -> str:
    """The phase with the largest share of a decode step, and the busiest resource of the run."""
    name, share = r.dominant()
    return f"{name} {share:.0%} of a step; {r.busiest} busiest"


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
            console.print(f"  [bold]{key}[/bold] ({sc.name}, {sc.gpus} GPUs): {text}")
    console.print("  [bold]metrics[/bold]: TPS overall = batch x (prompt + generated) / run time; "
                  "TPS decode = batch x (generated - 1) / decode time; TPOT, TTFT as engine/metrics.py")


def sweep(base: Scenario, gpu_counts=SWEEP_GPUS, families=None,
          attn_dp: int | None = None) -> dict[str, list[SimResult]]:
    """Each family's deployment, replicated over each GPU count (skipped where it does not
    divide); EP families with attention data-parallel size `attn_dp`."""
    out = {}
    for label, name in (families or SWEEP_FAMILIES).items():
        dep = Deployment.parse(name)
        out[label] = [simulate(dataclasses.replace(base, deployment=dep, gpus=n).with_attn_dp(attn_dp))
                      for n in gpu_counts if n % dep.world_size == 0
                      and base.workload.batch_size >= n // dep.world_size]
    return out


def expert_sweep(base: Scenario, gpu_counts=SWEEP_GPUS, experts=(16, 64, 256),
                 attn_dp: int | None = None) -> dict[str, list[SimResult]]:
    """Expert parallelism that grows with the cluster: for a model of E experts (the base
    model's top-k and expert size, so the same active parameters and E / base experts times the
    expert weights), EP = min(GPUs, E) ranks, and data-parallel replicas of it beyond E GPUs.
    Each rank's attention is data-parallel over its share of the batch, as the engine's EP, or
    (`attn_dp`) split over attention groups of EP / attn_dp ranks; points whose groups do not
    divide the heads are left out."""
    out = {}
    for n_experts in experts:
        cfg = base.cfg.with_(n_experts=n_experts)
        runs = []
        for n in gpu_counts:
            dep = Deployment(ep=min(n, n_experts))
            if n % dep.world_size or base.workload.batch_size < n:
                continue  # an EP rank needs at least one sequence
            try:
                sc = dataclasses.replace(base, cfg=cfg, deployment=dep, gpus=n).with_attn_dp(attn_dp)
            except ValueError:
                continue  # attention groups of ep / attn_dp ranks do not divide the heads
            runs.append(simulate(sc))
        out[f"EP, {n_experts} experts"] = runs
    return out


def require_matplotlib():
    """pyplot on the Agg backend, or a one-line ValueError naming the fix (before any work)."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise ValueError("simulate --sweep plots with matplotlib, which is not installed; install it "
                         "with `pip install expertmesh[plot]`, or drop --sweep") from None
    return plt


def plot_sweep(curves: dict[str, list[SimResult]], out_dir: str | Path) -> list[Path]:
    """Write tps.png and tpot.png (overall TPS and TPOT against GPU count) into `out_dir`."""
    plt = require_matplotlib()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for key, label, value in (("tps", "overall TPS (tokens/s)", lambda r: r.metrics.overall_tps),
                              ("tpot", "TPOT (ms)", lambda r: r.metrics.tpot_s * 1e3)):
        fig, ax = plt.subplots(figsize=(6, 4))
        for family, results in curves.items():
            results = [r for r in results if r.fits]  # a deployment that does not fit has no figure
            name = results[0].scenario.deployment.name if results else ""
            ax.plot([r.scenario.gpus for r in results], [value(r) for r in results], marker="o",
                    label=family if family.startswith("EP,") else f"{family} ({name} replicas)")
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


def serving_table(rows, rate: float, ttft_slo: float | None, tpot_slo: float | None,
                  title: str | None = None) -> Table:
    """`rows`: (SimResult, Served) pairs; latency percentiles, throughput, the share of prompt
    tokens the prefix cache held, preemptions (per replica) and goodput."""
    table = Table(title=title or f"serving {rate:g} requests/s (Poisson), continuous batching")
    slo = f"TTFT <= {ms(ttft_slo) if ttft_slo else '-'} ms, TPOT <= {ms(tpot_slo) if tpot_slo else '-'} ms"
    for col in ("method", "TTFT p50 ms", "TTFT p90 ms", "TPOT p50 ms", "TPOT p90 ms", "requests/s",
                "output tok/s", "prompt cached", "preemptions", f"goodput req/s ({slo})"):
        table.add_column(col, justify="left" if col == "method" else "right")
    for r, s in rows:
        sc = r.scenario
        n = len(s.ttft_s)
        table.add_row(sc.name + (f" x{sc.replicas}" if sc.replicas > 1 else ""),
                      ms(s.percentile("ttft_s", 50)), ms(s.percentile("ttft_s", 90)),
                      ms(s.percentile("tpot_s", 50)), ms(s.percentile("tpot_s", 90)),
                      f"{n / s.duration_s * sc.replicas:,.2f}",
                      f"{s.output_tokens / s.duration_s * sc.replicas:,.0f}",
                      f"{s.cached_fraction:.0%}", str(s.preemptions),
                      f"{s.goodput(ttft_slo, tpot_slo) * sc.replicas:,.2f}")
    return table
