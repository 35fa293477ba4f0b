"""expertmesh side by side with its peers, measured in one run on this machine:

    python -m benchmarks [--out DIR] [--quick] [--only deepspeed,transformers,...] [--skip ...]

Sections (in this order):
  deepspeed     expert-parallel MoE layer, EP=2 on 2 gloo ranks, vs DeepSpeed-MoE and a plain layer (peers.py)
  transformers  single-device MoE block vs transformers' Mixtral and Qwen2-MoE blocks (peers.py)
  efficiency    the MoE block's GFLOP/s vs plain matmuls of the same shapes (moe_block.py)
  deployments   single / ep2 / tp2 / pp2 end to end on 2 ranks (deployments.py)
  overlap       the overlapped vs synchronous token exchange, EP=2 layer (overlap.py part 1)
  cross-node    cross-node bytes, flat vs hierarchical exchange, 16 ranks as 4 x 4 (overlap.py part 2)
  simulator     the simulator's predictions vs published H100 / H200 figures (sim_vs_published.py)
  serving       expertmesh serve (single, ep2, tp2) vs transformers serve under load (serving.py)

Every section interleaves its repetitions and reports medians. Prints the tables, writes
DIR/results.json and one PNG per section. A peer that is not installed (`pip install -e .[peers]`)
or cannot run here is reported as skipped with the reason. The run ends with one summary of the
comparisons against peers and one of those against expertmesh's own baselines.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import torch
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from benchmarks import deployments, moe_block, overlap, peers, report, serving
from benchmarks.peers import Dims, col, section
from expertmesh.config import Workload, preset

SECTIONS = ("deepspeed", "transformers", "efficiency", "deployments", "overlap", "cross-node", "simulator",
            "serving")
SMALL = Dims(d_model=1024, experts=8, top_k=2, hidden=2816)  # the `small` preset's MoE layer
TINY = Dims(d_model=64, experts=4, top_k=2, hidden=128)


@dataclass(frozen=True)
class Profile:
    """How much of each section to run. `full` is the documented run (under 15 minutes on 2
    cores), `quick` about 2 minutes, `smoke` seconds (tiny sizes, for tests)."""

    name: str
    dims: Dims
    ds_tokens: tuple[int, ...]      # tokens per rank
    ds_reps: int
    hf_tokens: tuple[int, ...]
    hf_reps: int
    eff_tokens: int
    eff_reps: int
    dep_reps: int
    dep_quick: bool
    dep_cfg: dict | None = None     # preset("tiny", **dep_cfg) instead of `small`
    dep_loads: dict = field(default_factory=dict)
    overlap_argv: tuple[str, ...] = ("--dtype", "fp32", "--tokens", "1024", "--reps", "2")


PROFILES = {
    "full": Profile("full", SMALL, ds_tokens=(8, 64, 512), ds_reps=5, hf_tokens=(8, 128, 1024),
                    hf_reps=3, eff_tokens=1024, eff_reps=3, dep_reps=2, dep_quick=False),
    "quick": Profile("quick", SMALL, ds_tokens=(8, 128), ds_reps=3, hf_tokens=(8, 256), hf_reps=2,
                     eff_tokens=256, eff_reps=3, dep_reps=1, dep_quick=True,
                     overlap_argv=("--quick", "--tokens", "256")),
    "smoke": Profile("smoke", TINY, ds_tokens=(4, 32), ds_reps=1, hf_tokens=(4, 32), hf_reps=1,
                     eff_tokens=64, eff_reps=1, dep_reps=1, dep_quick=True,
                     dep_cfg=dict(n_layers=2, n_experts=4, d_model=64, n_heads=4, head_dim=16,
                                  expert_hidden=128, vocab_size=128, max_seq_len=64),
                     dep_loads={"smoke": Workload(batch_size=2, prompt_len=8, gen_len=2)},
                     overlap_argv=("--quick", "--preset", "tiny", "--dtype", "fp32", "--tokens", "64")),
}


def steps(name: str, profile: Profile) -> int:
    """Progress steps of a section (what its `progress` callback is called for)."""
    loads = len(profile.dep_loads) if profile.dep_loads else len(deployments.workloads(profile.dep_quick))
    return {"deepspeed": len(profile.ds_tokens), "transformers": len(peers.FAMILIES) * len(profile.hf_tokens),
            "efficiency": 1, "overlap": 1, "cross-node": 1, "simulator": 1,
            "serving": serving.steps(profile.name),
            "deployments": loads * (len(deployments.DEPLOYMENTS) * profile.dep_reps + 1)}[name]


# -- expertmesh-only sections --------------------------------------------------------------------


def efficiency(profile: Profile, progress: Callable[[], None], threads: int = 2) -> dict:
    """moe_block.measure: the grouped MoE block against the same FLOPs as two plain matmuls."""
    title = "Compute efficiency: MoE block vs plain matmul (roofline of this machine)"
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        dims = profile.dims
        r = moe_block.measure(tokens=profile.eff_tokens, d_model=dims.d_model, experts=dims.experts,
                              top_k=dims.top_k, hidden=dims.hidden, dtype="bf16", reps=profile.eff_reps)
    finally:
        torch.set_num_threads(before)
    progress()
    # the headline ratio is the grouped block's (the loop is its fallback, shown for reference)
    rows = [{"variant": name, **v, **({"ratio": v["vs_dense"]} if name == "MoE block, grouped mm" else {})}
            for name, v in r["variants"].items()]
    out = section(title, "ourselves", setup={k: v for k, v in r.items() if k != "variants"}, rows=rows)
    out["columns"] = [col("variant", "variant", "{}"), col("ms", "ms", "{:,.1f}"),
                      col("gflops", "GFLOP/s", "{:,.1f}"), col("tokens_per_s", "tokens/s"),
                      col("vs_dense", "fraction of plain matmul", "{:.2f}")]
    out["plot"] = {"kind": "bar", "x": "variant", "y": ["gflops"], "labels": ["GFLOP/s"],
                   "ylabel": "GFLOP/s"}
    out["summary"] = f"{r['tokens']} tokens, bf16, {r['where']}"
    out["notes"] = [
        "plain matmul: x [T*k, D] @ W_up.T -> gelu -> @ W_down.T, the expert FLOPs with no routing "
        "and perfectly even experts; the ratio is the MoE block's share of that roofline "
        f"(target {r['target']}).",
        f"tokens per expert {r['tokens_per_expert']} (max / mean {r['imbalance']:.2f}); grouped vs "
        f"per-expert loop max |diff| {r['max_abs_diff']:.1e}.",
    ]
    return out


def deployment_section(profile: Profile, progress: Callable[[], None]) -> dict:
    title = "Deployments end to end, 2 ranks on 2 cores"
    cfg = preset("tiny", **profile.dep_cfg) if profile.dep_cfg else None
    data = deployments.measure("bf16", profile.dep_reps, profile.dep_quick, cfg=cfg,
                               loads=profile.dep_loads or None, progress=progress)
    rows, notes = [], []
    for label, r in data.items():
        base = r["medians"]["single"]["overall_tps"]
        w = r["workload"]
        for dep, m in r["medians"].items():
            rows.append({"workload": label, "deployment": dep, **m, "ttft_ms": m["ttft_s"] * 1e3,
                         "tpot_ms": m["tpot_s"] * 1e3, "vs_single": m["overall_tps"] / base})
        shares = r["ep2_shares"]
        total = sum(shares.values()) or 1.0
        notes.append(f"{label} ({r['model']}, {r['dtype']}, batch {w['batch_size']} x prompt "
                     f"{w['prompt_len']} + {w['gen_len']}, medians of {r['reps']}): ep2 MoE time "
                     "per rank " + ", ".join(f"{k} {v * 1e3:.0f} ms ({v / total:.0%})"
                                             for k, v in shares.items()))
    out = section(title, "ourselves", rows=rows, notes=notes, setup={"data": data})
    out["columns"] = [col("workload", "workload", "{}"), col("deployment", "deployment", "{}"),
                      col("prefill_tps", "prefill TPS"), col("decode_tps", "decode TPS"),
                      col("overall_tps", "overall TPS"), col("ttft_ms", "TTFT ms", "{:.1f}"),
                      col("tpot_ms", "TPOT ms", "{:.1f}"), col("vs_single", "overall vs single", "x{:.2f}")]
    out["plot"] = {"kind": "bar", "x": "deployment", "group": "workload",
                   "y": ["prefill_tps", "decode_tps", "overall_tps"],
                   "labels": ["prefill TPS", "decode TPS", "overall TPS"], "ylabel": "tokens/s"}
    return out


def overlap_section(profile: Profile, progress: Callable[[], None]) -> dict:
    """overlap.py part 1: the EP=2 layer, synchronous vs overlapped with 1-8 chunks."""
    title, rows = overlap.part1(overlap.parse_args(list(profile.overlap_argv)))
    progress()
    sync = rows[0]["ms"]
    for r in rows[1:len(overlap.VARIANTS)]:
        r["ratio"] = sync / r["ms"]  # speed-up of the overlapped call over the synchronous one
    out = section("Overlap: EP=2 MoE layer, overlapped vs synchronous exchange", "ourselves", rows=rows)
    out["columns"] = [col(*c) for c in overlap.LAYER_COLUMNS]
    best = max((r for r in rows if r["efficiency"] is not None), key=lambda r: r["efficiency"])
    out["summary"] = f"vs sync; best {best['variant']} hides {best['efficiency']:.0%} of the exchange"
    out["plot"] = {"kind": "bar", "x": "variant", "y": ["ms"], "labels": ["ms per call"], "ylabel": "ms"}
    out["notes"] = [title, "overlap efficiency = time saved vs sync / min(exchange alone, compute alone)"]
    return out


def cross_node_section(profile: Profile, progress: Callable[[], None]) -> dict:
    """overlap.py part 2: cross-node bytes of flat vs hierarchical, default vs optimised placement."""
    title, rows = overlap.part2(overlap.parse_args(list(profile.overlap_argv)))
    progress()
    for r in rows:
        r["ratio"] = 1 / r["vs_flat"]  # how many times fewer bytes than flat with default placement
    out = section("Cross-node bytes: flat vs hierarchical exchange, 16 ranks as 4 nodes x 4", "ourselves",
                  rows=rows, notes=[title, overlap.CROSS_NODE_NOTE])
    out["columns"] = [col(*c) for c in overlap.CROSS_NODE_COLUMNS]
    out["summary"] = "bytes of flat exchange, default placement / bytes of each variant"
    out["plot"] = {"kind": "bar", "x": "exchange", "y": ["kib_per_step"], "labels": ["KiB per step"],
                   "ylabel": "KiB per step"}
    return out


# -- the run -------------------------------------------------------------------------------------


def machine() -> dict:
    model = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                  if line.startswith("model name")), platform.processor()) if Path("/proc/cpuinfo").exists() \
        else platform.processor()
    return {"cpu": model, "cores": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity")
            else os.cpu_count(), "load_avg_at_start": os.getloadavg(), "python": platform.python_version(),
            "torch": torch.__version__, "platform": platform.platform()}


def run_section(name: str, profile: Profile, progress: Callable[[], None]) -> dict:
    if name == "deepspeed":
        return peers.deepspeed_moe(profile.ds_tokens, profile.ds_reps, profile.dims, progress=progress)
    if name == "transformers":
        return peers.transformers_blocks(profile.hf_tokens, profile.hf_reps, profile.dims, progress=progress)
    if name == "efficiency":
        return efficiency(profile, progress)
    if name == "deployments":
        return deployment_section(profile, progress)
    if name == "simulator":
        from benchmarks.sim_vs_published import benchmark_section
        progress()
        return benchmark_section()
    if name == "overlap":
        return overlap_section(profile, progress)
    if name == "serving":
        return serving.serving_section(profile.name, progress)
    return cross_node_section(profile, progress)


def parse_sections(text: str | None) -> list[str]:
    names = [s.strip() for s in text.split(",") if s.strip()] if text else []
    unknown = [s for s in names if s not in SECTIONS]
    if unknown:
        raise SystemExit(f"unknown section(s) {unknown}; use some of: {', '.join(SECTIONS)}")
    return names


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__.splitlines()[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog="\n".join(__doc__.splitlines()[2:]))
    parser.add_argument("--out", default="benchmark-results", help="output folder (default: %(default)s)")
    size = parser.add_mutually_exclusive_group()
    size.add_argument("--quick", action="store_true", help="about 2 minutes: fewer sizes and repetitions")
    size.add_argument("--smoke", action="store_true", help="tiny sizes, seconds: checks the script only")
    parser.add_argument("--only", help=f"comma-separated sections to run ({', '.join(SECTIONS)})")
    parser.add_argument("--skip", help="comma-separated sections to leave out")
    parser.add_argument("--no-plots", action="store_true", help="write no PNGs")
    args = parser.parse_args(argv)
    profile = PROFILES["smoke" if args.smoke else "quick" if args.quick else "full"]
    chosen = parse_sections(args.only) or list(SECTIONS)
    chosen = [s for s in chosen if s not in parse_sections(args.skip)]
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)

    console = Console(width=None if sys.stdout.isatty() else 150)  # full tables in logs
    started, t0 = datetime.now(timezone.utc).isoformat(timespec="seconds"), time.perf_counter()
    results = {"command": "python -m benchmarks " + " ".join(argv if argv is not None else sys.argv[1:]),
               "profile": asdict(profile), "machine": machine(), "started": started, "sections": {}}
    with Progress(TextColumn("{task.description:<14}"), BarColumn(), MofNCompleteColumn(),
                  TimeElapsedColumn(), console=console) as bar:
        tasks = {name: bar.add_task(name, total=steps(name, profile)) for name in chosen}
        for name in chosen:
            sec = run_section(name, profile, lambda name=name: bar.advance(tasks[name]))
            bar.update(tasks[name], completed=steps(name, profile))
            results["sections"][name] = sec
            report.render(sec, bar.console)
    results["elapsed_s"] = time.perf_counter() - t0
    for summary in report.headline(results["sections"]):
        console.print(summary)
    plots = []
    if not args.no_plots:
        try:
            plots = [report.plot(k, s, out_dir) for k, s in results["sections"].items()]
        except ImportError as exc:  # matplotlib is an extra
            console.print(f"no plots: {exc} (pip install -e .[plot])", highlight=False)
    results["plots"] = [str(p) for p in plots if p]
    path = report.write_json(results, out_dir)
    console.print(f"{len(chosen)} sections in {results['elapsed_s']:.0f} s; wrote {path}"
                  + (f" and {len(results['plots'])} plots" if results["plots"] else ""), highlight=False)
    return results


if __name__ == "__main__":
    main()
