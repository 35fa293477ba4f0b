"""Command line of the simulator: `simulate`, `plan`, `calibrate`.

`add_commands(subparsers)` registers them on an argparse subparsers object; each handler takes
the parsed arguments and returns an exit code.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
from pathlib import Path

from rich.table import Table

from expertmesh.config import Workload
from expertmesh.deployment import Deployment
from expertmesh.sim.hardware import get_profile
from expertmesh.sim.models import load_model
from expertmesh.sim.plan import OBJECTIVES, evaluate, rank_by_goodput, serve_deployment, tps
from expertmesh.sim.report import (SWEEP_GPUS, console as report_console, dominant, expert_sweep, plot_sweep,
                                   print_assumptions, require_matplotlib, results_table, serving_table,
                                   sweep)
from expertmesh.sim.routing import Routing
from expertmesh.parallel.dispatch import LOW_LATENCY_TOKENS
from expertmesh.parallel.eplb import INTERVAL, EplbConfig
from expertmesh.parallel.expert import OVERLAPS, TWO_BATCH_TOKENS
from expertmesh.sim.scenario import ATTENTION_BACKENDS, Scenario
from expertmesh.sim.simulator import simulate

_UNITS = {"ms": 1e-3, "us": 1e-6, "s": 1.0}


def parse_seconds(text: str) -> float:
    """`"10ms"`, `"500us"`, `"0.01s"` or `"0.01"` (seconds) -> seconds."""
    for unit, scale in _UNITS.items():
        if text.endswith(unit) and not (unit == "s" and text[:-1].endswith(("m", "u"))):
            return float(text[: -len(unit)]) * scale
    return float(text)


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--preset", default="paper", help="model preset (default: paper)")
    p.add_argument("--model", help="a Hugging Face config.json or checkpoint directory (no weights are "
                                   "read): Mixtral, Qwen2-MoE, OLMoE, Qwen3-MoE, DeepSeek-V3, "
                                   "dense Llama / Qwen2")
    p.add_argument("--gpu", default="h100", help="h100, h200, a100, b200 or a calibrated profile JSON")
    p.add_argument("--batch", type=int, default=128, help="sequences in the batch")
    p.add_argument("--prompt-len", type=int, default=10000, help="prompt tokens per sequence")
    p.add_argument("--gen-len", type=int, default=128, help="generated tokens per sequence")
    p.add_argument("--gpus-per-node", type=int, help="default: the hardware's (8 for the GPUs)")
    p.add_argument("--a2a-chunks", type=int, default=1,
                   help="EP exchange chunks overlapped with expert compute (1: none, as the engine)")
    p.add_argument("--hierarchical", action="store_true", help="hierarchical (rail-aligned) all-to-all")
    p.add_argument("--routing", default="uniform", help="uniform, or zipf[:skew] for skewed expert load")
    p.add_argument("--micro", type=int, help="micro-batches of prefill and decode (default: one per stage)")
    p.add_argument("--prefill-micro", type=int, help="micro-batches of the prefill step (default: --micro)")
    p.add_argument("--decode-micro", type=int, help="micro-batches of each decode step (default: --micro)")
    p.add_argument("--a2a-kernel", choices=("nccl", "low-latency"), default="nccl",
                   help="how the low-latency exchange runs: nccl (fixed-size all_to_all_single, as "
                        "the engine) or a DeepEP-style RDMA kernel")
    p.add_argument("--low-latency-tokens", type=int, default=LOW_LATENCY_TOKENS,
                   help=f"EP: a forward whose every rank has at most N tokens takes the low-latency "
                        f"exchange (no count exchange, no host sync), as the engine (default "
                        f"{LOW_LATENCY_TOKENS}; 0: never)")
    p.add_argument("--overlap", choices=OVERLAPS, default="auto",
                   help="EP: tbo (two-batch overlap), chunks (--a2a-chunks overlapped with expert "
                        f"compute), none, or auto (tbo from {TWO_BATCH_TOKENS} tokens per rank), as "
                        "the engine's flag (default auto)")
    p.add_argument("--attn-dp", type=int, help="EP: attention data-parallel size; the ep / N ranks "
                                               "of a group split its heads (default: ep)")
    p.add_argument("--nics-per-node", type=int, help="network ports per node, shared by the GPUs "
                                                     "that use them at once (default: one per GPU)")
    p.add_argument("--cuda-graphs", action="store_true", help="decode steps replay captured CUDA graphs")
    p.add_argument("--attention-backend", choices=ATTENTION_BACKENDS, default="flashinfer",
                   help="decode attention reads the KV cache in place (flashinfer, default) or gathers "
                        "a copy first (torch, the engine without FlashInfer)")
    p.add_argument("--fp8", action="store_true", help="FP8 weights, KV cache, dispatch and GEMMs")
    p.add_argument("--rate", type=float, help="serve Poisson arrivals at this many requests/s (prompt and "
                                              "output lengths around --prompt-len, --gen-len)")
    p.add_argument("--prefix-hit-rate", type=float, default=0.0,
                   help="with --rate: the share of each prompt that repeats a prefix the requests share; "
                        "what the engine's prefix cache finds of it is simulated (default 0)")
    p.add_argument("--ttft-slo", help="largest acceptable TTFT for goodput, e.g. 2s")
    p.add_argument("--tpot-slo", help="largest acceptable TPOT, e.g. 50ms")


def _hardware(args):
    hw = get_profile(args.gpu)
    if args.nics_per_node is not None:
        if args.nics_per_node < 1:
            raise ValueError(f"--nics-per-node {args.nics_per_node} must be at least 1")
        hw = hw.with_(nics_per_node=args.nics_per_node)
    return hw


def _base(args, deployment: Deployment, gpus: int | None) -> Scenario:
    if not 0 <= args.prefix_hit_rate < 1:
        raise ValueError(f"--prefix-hit-rate {args.prefix_hit_rate} must be in [0, 1)")
    return Scenario(load_model(args.preset, args.model), deployment,
                    Workload(batch_size=args.batch, prompt_len=args.prompt_len, gen_len=args.gen_len),
                    _hardware(args), gpus=gpus, gpus_per_node=args.gpus_per_node,
                    a2a_chunks=args.a2a_chunks, hierarchical_a2a=args.hierarchical,
                    routing=Routing.parse(args.routing),
                    prefill_micro=args.prefill_micro or args.micro,
                    decode_micro=args.decode_micro or args.micro, a2a_kernel=args.a2a_kernel,
                    cuda_graphs=args.cuda_graphs, fp8=args.fp8, attention_backend=args.attention_backend,
                    low_latency_tokens=args.low_latency_tokens, overlap=args.overlap)


def cmd_simulate(args) -> int:
    console = report_console()
    deployments = [Deployment.parse(d) for d in args.deployments.split(",")]
    if args.attn_dp is not None and all(d.ep == 1 for d in deployments):
        raise ValueError(f"--attn-dp acts on expert-parallel deployments only and none of "
                         f"{args.deployments} has an EP axis; drop it or add an epN deployment")
    base = _base(args, deployments[0], args.gpus)
    if args.sweep:
        require_matplotlib()
        counts = [n for n in SWEEP_GPUS if n <= args.max_gpus]
        curves = sweep(base, counts, attn_dp=args.attn_dp)
        if args.sweep_experts:
            curves.update(expert_sweep(base, counts, [int(e) for e in args.sweep_experts.split(",")],
                                       attn_dp=args.attn_dp))
        results = [r for rs in curves.values() for r in rs]
        for path in plot_sweep(curves, args.out):
            console.print(f"wrote {path}")
        console.print(results_table(results, "sweep"))
        print_assumptions(console, [r.scenario for r in results])
        return 0
    results = [simulate(dataclasses.replace(base, deployment=d, gpus=args.gpus).with_attn_dp(args.attn_dp))
               for d in deployments]
    console.print(results_table(results, f"simulated on {base.hardware.name}"))
    if args.rate:
        console.print(serving_table([(r, serve_deployment(r.scenario, args.rate, prefix_hit_rate=args.prefix_hit_rate))
                                     for r in results if r.fits],
                                    args.rate, _slo(args.ttft_slo), _slo(args.tpot_slo)))
    print_assumptions(console, [r.scenario for r in results])
    if args.trace:
        Path(args.trace).mkdir(parents=True, exist_ok=True)
        for r in results:
            path = Path(args.trace) / f"{r.scenario.deployment.name}.trace.json"
            path.write_text(json.dumps(r.trace))
            console.print(f"wrote {path} (open in ui.perfetto.dev)")
    if args.json:
        Path(args.json).write_text(json.dumps([r.to_dict() for r in results], indent=2))
    if not any(r.fits for r in results):
        console.print("no deployment fits in device memory: use more GPUs, a shorter context or a smaller batch")
        return 1
    return 0


def _slo(text: str | None) -> float | None:
    return parse_seconds(text) if text else None


def cmd_plan(args) -> int:
    console = report_console()
    ttft_slo, tpot_slo = _slo(args.ttft_slo), _slo(args.tpot_slo)
    base = _base(args, Deployment(), None)
    if args.rate:  # goodput under load: the SLOs judge each request, not the static batch
        verdicts = evaluate(base, args.gpus, attn_dp=args.attn_dp)
        ranked_g = rank_by_goodput(verdicts, args.rate, ttft_slo, tpot_slo, prefix_hit_rate=args.prefix_hit_rate)
        console.print(serving_table([(g.result, g.served) for g in ranked_g], args.rate, ttft_slo, tpot_slo,
                                    f"deployments on {args.gpus} x {base.hardware.name} at {args.rate:g} "
                                    f"requests/s, best goodput first"))
        ranked = [g.result for g in ranked_g if g.goodput > 0]
        rejected = [v for v in verdicts if not v.fits]
    else:
        verdicts = evaluate(base, args.gpus, tpot_slo, attn_dp=args.attn_dp)
        ranked = sorted((v.result for v in verdicts if v.ok), key=lambda r: tps(r, args.objective), reverse=True)
        rejected = [v for v in verdicts if not v.ok]
        console.print(results_table(ranked, f"deployments on {args.gpus} x {base.hardware.name}, best "
                                            f"{args.objective} TPS first"
                                            + (f" at TPOT <= {args.tpot_slo}" if tpot_slo else "")))
    for v in rejected:
        why = [] if v.fits else [f"needs {v.result.memory.total_bytes / 1e9:.1f} GB per GPU"]
        why += [] if v.meets_slo else [f"TPOT {v.result.metrics.tpot_s * 1e3:.2f} ms over the SLO"]
        console.print(f"  rejected {v.result.scenario.name}: {'; '.join(why)}")
    for r in ranked[:3]:
        console.print(f"  {r.scenario.name}: {dominant(r)}")
    if ranked:
        console.print(f"  [bold]{ranked[0].scenario.name}[/bold] wins: "
                      + (f"its decode step is shortest where it counts ({dominant(ranked[0])})"
                         if not args.rate else "the highest goodput at this rate (ties: lowest TPOT, "
                                               "then TTFT, at the 90th percentile)"))
    print_assumptions(console, [r.scenario for r in ranked] or base)
    if args.json:
        Path(args.json).write_text(json.dumps([r.to_dict() for r in ranked], indent=2))
    return 0 if ranked else 1


def cmd_calibrate(args) -> int:
    from expertmesh.sim.calibrate import calibrate  # imports the engine and launcher: only here

    profile = calibrate(max_ranks=args.max_ranks, repeat=args.repeat)
    profile.save(args.out)
    report_console().print(f"wrote {args.out}: {profile}")
    return 0


def cmd_simulate_eplb(args) -> int:
    """Imbalance with and without online EPLB for a moving skew, and the cost of its moves."""
    from expertmesh.sim.eplb import EplbScenario, move_cost, simulate_eplb

    cfg = load_model(args.preset, args.model)
    dep = Deployment.parse(args.deployment)
    if dep.ep == 1 or dep.world_size != dep.ep:
        raise ValueError(f"simulate-eplb models one EP group: give --deployment epN, not {args.deployment}")
    dep.validate(cfg)
    for flag, value in (("--steps", args.steps), ("--redundant-experts", args.redundant_experts)):
        if value < 1:
            raise ValueError(f"{flag} {value} must be at least 1")
    if args.shift < 0:
        raise ValueError(f"--shift {args.shift} must be >= 0 (0: the hot experts never move)")
    window = args.eplb_window or max(1, args.eplb_interval // 2)
    EplbConfig(args.eplb_interval, window).validate()
    scenario = EplbScenario(cfg.n_experts, cfg.top_k, dep.ep, args.redundant_experts, Routing.parse(args.routing),
                            args.shift, args.eplb_interval, window, cfg.n_layers - len(cfg.dense_layers))
    result = simulate_eplb(scenario, args.steps)
    matrices = 3 if cfg.expert_kind == "swiglu" else 2
    expert_bytes = matrices * cfg.d_model * cfg.expert_hidden * cfg.torch_dtype.itemsize
    cost = move_cost(get_profile(args.gpu), expert_bytes, result["max_slots_received_per_layer"], dep.ep,
                     parse_seconds(args.step_time) if args.step_time else None)
    console = report_console()
    console.print(f"{cfg.name} {dep.name}, {args.routing} shifting every {args.shift} steps, "
                  f"{args.redundant_experts} spare slot(s) per rank, interval {args.eplb_interval}, "
                  f"window {window}, {args.steps} steps")
    console.print(f"mean imbalance (max/mean rank load): start-up placement {result['imbalance_static']:.2f}, "
                  f"online rebalancing {result['imbalance_online']:.2f} "
                  f"({result['imbalance_online'] / result['imbalance_static']:.2f}x), {result['rebalances']} rebalances")
    stall = "" if cost["stall_s"] is None else f", not hidden by a {args.step_time} step: {cost['stall_s'] * 1e3:.2f} ms"
    console.print(f"a layer's move on the busiest receiver: {cost['bytes'] / 2**20:.1f} MiB over {cost['link']}, "
                  f"{cost['copy_s'] * 1e3:.2f} ms{stall}")
    if args.json:
        Path(args.json).write_text(json.dumps({**result, **cost}, indent=2))
    return 0


def cmd_simulate_failure(args) -> int:
    """What one rank's loss costs a `serve --elastic` deployment: the gap and the throughput after."""
    from expertmesh.sim.failure import FailureModel, expert_bytes, simulate_failure

    for flag, value in (("--batch", args.batch), ("--prompt-len", args.prompt_len)):
        if value < 1:
            raise ValueError(f"{flag} {value} must be at least 1")
    if args.redundant_experts < 0:
        raise ValueError(f"--redundant-experts {args.redundant_experts} must be >= 0")
    sc = Scenario(load_model(args.preset, args.model), Deployment.parse(args.deployment),
                  Workload(batch_size=args.batch, prompt_len=args.prompt_len, gen_len=args.gen_len),
                  get_profile(args.gpu), gpus_per_node=args.gpus_per_node, routing=Routing.parse(args.routing))
    model = FailureModel(parse_seconds(args.detect), parse_seconds(args.regroup_per_rank),
                         args.reload_bandwidth * 1e9, args.generated)
    before, losses = simulate_failure(sc, args.redundant_experts, model,
                                      [args.lost_rank] if args.lost_rank is not None else None)
    console = report_console()
    dep, hw = sc.deployment, sc.hardware
    h2d = f"{hw.h2d_bw / 1e9:g} GB/s to the device" if hw.h2d_bw else "no copy (the device is the host)"
    console.print(f"{sc.cfg.name} {dep.name} on {hw.name}, {sc.gpus_per_node} per node, "
                  f"{args.redundant_experts} spare replica(s); batch {args.batch}, prompt {args.prompt_len}, "
                  f"generate {args.gen_len}; detect {model.detect_s * 1e3:g} ms, regroup "
                  f"{model.regroup_s_per_rank * 1e3:g} ms per survivor; an expert {expert_bytes(sc) / 2**20:,.0f} MiB "
                  f"a layer, read at {args.reload_bandwidth:g} GB/s per survivor, {h2d}")
    if not before.fits:
        console.print(f"{dep.name} does not fit before any loss ({before.memory.total_bytes / 1e9:.1f} GB per "
                      f"GPU): use more GPUs, a shorter context or a smaller batch")
        return 1
    console.print(_failure_table(losses, dep.ep))
    ends = [l for l in losses if not l.fits]
    if ends:
        console.print(f"ep{dep.ep - 1} needs more than a GPU's memory: the survivors cannot hold the experts, "
                      f"so a loss ends the server")
    else:
        gap = sum(l.gap_s for l in losses) / len(losses)
        loss = sum(l.throughput_loss for l in losses) / len(losses)
        console.print(f"mean over the ranks lost: gap {gap:.2f} s, decode throughput {-loss:+.1%} "
                      f"({losses[0].tps_before:,.0f} tokens/s before); rank 0's loss ends the server")
    if args.json:
        Path(args.json).write_text(json.dumps({
            "deployment": dep.name, "hardware": hw.name, "redundant_experts": args.redundant_experts,
            "expert_bytes": expert_bytes(sc), "reload_bandwidth": model.reload_bw, "h2d_bandwidth": hw.h2d_bw,
            "memory_before_bytes": before.memory.total_bytes,
            "losses": [l.to_dict() for l in losses]}, indent=2))
    return 0


def _failure_table(losses, ep: int) -> Table:
    """One row per outcome, the ranks whose loss gives it named together."""
    table = Table(title=f"one rank lost: ep{ep} -> ep{ep - 1}")
    for col in ("lost rank", "its experts loaded / still held", "GB read (most)", "detect s", "regroup s",
                "reload s", "recompute s", "gap s", "decode tokens/s after", "change"):
        table.add_column(col, justify="left" if col == "lost rank" else "right")
    rows: dict = {}
    for l in losses:
        key = (l.loaded, l.covered, l.slowest_bytes, round(l.reload_s, 4), round(l.recompute_s, 4), l.fits,
               round(l.tps_after or 0))
        rows.setdefault(key, []).append(l)
    for same in rows.values():
        l = same[0]
        table.add_row(_ranks([x.lost for x in same]), f"{l.loaded} / {l.covered}", f"{l.slowest_bytes / 1e9:.2f}",
                      f"{l.detect_s:.2f}", f"{l.regroup_s:.2f}", f"{l.reload_s:.2f}", f"{l.recompute_s:.2f}",
                      f"{l.gap_s:.2f}" if l.fits else "-",
                      f"{l.tps_after:,.0f}" if l.fits else "ends", f"{-l.throughput_loss:+.1%}" if l.fits else "-")
    return table


def _ranks(ranks: list[int]) -> str:
    """[1, 2, 3, 5] -> "1-3, 5"."""
    runs: list[list[int]] = []
    for r in ranks:
        if runs and r == runs[-1][-1] + 1:
            runs[-1].append(r)
        else:
            runs.append([r])
    return ", ".join(f"{run[0]}-{run[-1]}" if len(run) > 1 else str(run[0]) for run in runs)


def _one_ep_group(p: argparse.ArgumentParser) -> None:
    """The model, the hardware and one EP group, for the commands that model one (eplb, failure)."""
    p.add_argument("--preset", default="paper", help="model preset (default: paper)")
    p.add_argument("--model", help="a Hugging Face config.json or checkpoint directory")
    p.add_argument("--gpu", default="h100", help="h100, h200, a100, b200 or a calibrated profile JSON")
    p.add_argument("--deployment", default="ep16", help="one EP group, epN (default ep16)")


def add_commands(subparsers) -> None:
    sim = subparsers.add_parser("simulate", help="predict TPS, TPOT, TTFT and memory on a GPU cluster")
    _common(sim)
    sim.add_argument("--deployments", default="tp8pp2,ep16", help="comma-separated, e.g. tp8pp2,ep16")
    sim.add_argument("--gpus", type=int, help="GPUs in all; beyond one deployment: data-parallel replicas")
    sim.add_argument("--json", help="write the results here")
    sim.add_argument("--trace", help="write a Perfetto trace of one decode step per deployment here")
    sim.add_argument("--sweep", action="store_true", help="plot TPS and TPOT against GPU count")
    sim.add_argument("--max-gpus", type=int, default=256, help="largest GPU count of the sweep")
    sim.add_argument("--sweep-experts", help="also sweep EP growing with the GPUs on models of these "
                                             "expert counts (same top-k and expert size), e.g. 16,64,256")
    sim.add_argument("--out", default="results/sweep", help="where --sweep writes its plots")
    sim.set_defaults(func=cmd_simulate)

    plan = subparsers.add_parser("plan", help="rank every deployment that fits on N GPUs")
    _common(plan)
    plan.add_argument("--gpus", type=int, required=True, help="GPUs in all")
    plan.add_argument("--objective", choices=OBJECTIVES, default="decode",
                      help="which TPS to rank by without --rate (default decode: overall TPS of long "
                           "prompts is almost all prefill)")
    plan.add_argument("--json", help="write the ranked results here")
    plan.set_defaults(func=cmd_plan)

    eplb = subparsers.add_parser("simulate-eplb", help="imbalance with and without online expert load "
                                 "balancing under a moving skew, and the cost of moving weights")
    _one_ep_group(eplb)
    eplb.add_argument("--routing", default="zipf:1.2", help="uniform, or zipf[:skew] (default zipf:1.2)")
    eplb.add_argument("--shift", type=int, default=2000, help="steps between moves of the hot experts "
                                                              "(0: never; default 2000)")
    eplb.add_argument("--redundant-experts", type=int, default=1, help="spare slots per rank (default 1)")
    eplb.add_argument("--eplb-interval", type=int, default=INTERVAL, help=f"default {INTERVAL}")
    eplb.add_argument("--eplb-window", type=int, default=None, help="default: half the interval")
    eplb.add_argument("--steps", type=int, default=20000, help="engine steps simulated (default 20000)")
    eplb.add_argument("--step-time", help="a decode step's time, e.g. 30ms: what a move must hide behind")
    eplb.add_argument("--json", help="write the figures here")
    eplb.set_defaults(func=cmd_simulate_eplb)

    fail = subparsers.add_parser("simulate-failure", help="what one EP rank's loss costs a serve --elastic "
                                 "deployment: the longest gap a client sees and the throughput after")
    _one_ep_group(fail)
    fail.add_argument("--gpus-per-node", type=int, help="default: the hardware's (8 for the GPUs)")
    fail.add_argument("--batch", type=int, default=128, help="sequences in flight")
    fail.add_argument("--prompt-len", type=int, default=10000, help="prompt tokens per sequence")
    fail.add_argument("--gen-len", type=int, default=128, help="generated tokens per sequence")
    fail.add_argument("--routing", default="uniform", help="uniform, or zipf[:skew]")
    fail.add_argument("--redundant-experts", type=int, default=0,
                      help="spare replicas, laid out as serve --elastic does: rank r's spares hold the "
                           "first experts of rank r+1 (default 0)")
    fail.add_argument("--lost-rank", type=int, help="the rank lost (default: each of 1 .. N-1 in turn)")
    fail.add_argument("--generated", type=int, help="tokens each request has at the loss, recomputed "
                                                    "with its prompt (default: half of --gen-len)")
    fail.add_argument("--detect", default="70ms", help="loss to the survivors leaving their groups "
                                                       "(default 70ms: the engine's polls; a hang: "
                                                       "serve's --hang-timeout more)")
    fail.add_argument("--regroup-per-rank", default="63ms",
                      help="forming the new groups, per survivor (default 63ms, measured on CPU gloo)")
    fail.add_argument("--reload-bandwidth", type=float, default=5.0,
                      help="GB/s each survivor reads the checkpoint at (default 5: an NVMe SSD)")
    fail.add_argument("--json", help="write the figures here")
    fail.set_defaults(func=cmd_simulate_failure)

    cal = subparsers.add_parser("calibrate", help="measure this machine into a hardware profile")
    cal.add_argument("--out", default="profile.json")
    cal.add_argument("--max-ranks", type=int, default=4, help="collectives are measured at 2 .. this")
    cal.add_argument("--repeat", type=int, default=5)
    cal.set_defaults(func=cmd_calibrate)
