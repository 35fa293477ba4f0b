"""`expertmesh run | compare` (and the simulator's commands): parse, validate, launch, report.

Every user mistake is caught before a rank starts and printed as one line (`error: ...`) with
exit code 2; a failing rank ends the run with its message and exit code 1; Ctrl-C stops every rank
and prints one line (exit code 130).
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import sys
import time
from pathlib import Path

import torch
from rich.console import Console
from rich.progress import Progress
from rich.table import Table

from expertmesh.checkpoint import decode, has_tokenizer
from expertmesh.deployment import Deployment
from expertmesh.engine.kv_budget import activation_reserve
from expertmesh.engine.result import RunResult
from expertmesh.engine.spec import RunSpec
from expertmesh.engine.worker import run_rank
from expertmesh.launch import RankFailure, check_launch, launch, local_device, under_torchrun
from expertmesh.parallel.placement import save_routing
from expertmesh.place_cli import add_commands as add_place_command
from expertmesh.profile import add_commands as add_profile_command
from expertmesh.run_flags import add_run_args, check_output, spec_from_flags
from expertmesh.server.cli import add_commands as add_server_commands
from expertmesh.sim.memory import kv_cache_bytes, rank_params
from expertmesh.sim.cli import add_commands as add_simulator_commands
from expertmesh.trace import write_trace

console = Console()
FP32_LOGIT_TOLERANCE = 1e-4  # max |logit - reference| accepted in fp32 (observed: about 1e-6)


class LazyProgress:
    """A rich progress bar over generation steps that appears only once a run has taken 1 s."""

    def __init__(self, total: int, label: str):
        self.total, self.label = total, label
        self.t0 = time.perf_counter()
        self.progress: Progress | None = None

    def __call__(self, step: int) -> None:
        if self.progress is None and time.perf_counter() - self.t0 > 1.0 and step + 1 < self.total:
            self.progress = Progress(console=Console(stderr=True), transient=True)
            self.progress.start()
            self.task = self.progress.add_task(self.label, total=self.total)
        if self.progress is not None:
            self.progress.update(self.task, completed=step + 1,
                                 description=f"{self.label} ({'prefill' if step == 0 else 'decode'})")
            if step + 1 >= self.total:
                self.progress.stop()


def _check_outputs(args) -> None:
    check_output("--json", args.json)
    check_output("--trace", args.trace, directory=True)
    check_output("--record-routing", getattr(args, "record_routing", None))


def execute(spec: RunSpec, args, label: str, alone: bool = False) -> RunResult | None:
    """Run a validated spec: in this process for `single` or when `alone` (compare's reference:
    under torchrun, on rank 0 only, once the deployments' process group is gone), else one
    process per rank."""
    progress = LazyProgress(spec.workload.gen_len, label)
    if alone or (spec.deployment.world_size == 1 and not under_torchrun()):
        torch.set_num_threads(max(1, os.cpu_count() or 1))
        device = local_device(spec.deployment.world_size, args.backend)
        if alone and device.type == "cuda":
            free, total = torch.cuda.mem_get_info(device)
            refusal = reference_refusal(spec, free, total)
            if refusal:
                raise ValueError(refusal)
        return run_rank(spec, device, on_step=progress)
    fn = functools.partial(run_rank, spec, on_step=progress)
    return launch(fn, spec.deployment.world_size, backend=args.backend, timeout=args.timeout)


def reference_refusal(spec: RunSpec, free: int, total: int, utilization: float = 0.9) -> str | None:
    """Why compare's single-device reference cannot run on a GPU with `free` of `total` bytes
    (its weights, the workload's KV cache and a forward's activations over `utilization` of the
    device), or None when it fits. On a GPU the reference runs on rank 0's GPU, after the
    deployments (a process that used CUDA cannot fork ranks), so this is checked then."""
    cfg, w = spec.cfg, spec.workload
    weights = rank_params(cfg, Deployment(), 0) * cfg.torch_dtype.itemsize
    kv = kv_cache_bytes(cfg, Deployment(), w, 0)
    reserve = activation_reserve(cfg, Deployment(), w.batch_size * w.prompt_len, w.batch_size)
    if weights + kv + reserve <= utilization * total - (total - free):
        return None
    return (f"compare's single-device reference needs {(weights + kv + reserve) / 2**30:.1f} GiB "
            f"(weights {weights / 2**30:.1f}, KV {kv / 2**30:.1f}, activations {reserve / 2**30:.1f}) "
            f"and one GPU gives {(utilization * total - (total - free)) / 2**30:.1f} GiB; compare a "
            f"model that fits one GPU, or run each deployment with `expertmesh run --json` and "
            f"compare their tokens")


def _ms(seconds: float | None) -> str:
    return "-" if seconds is None else f"{seconds * 1e3:.1f}"


def _num(x: float | None) -> str:
    return "-" if x is None else f"{x:,.0f}"


def _mib(n: int) -> str:
    return f"{n / 2**20:,.1f}"


def cmd_run(args) -> int:
    _check_outputs(args)
    spec = spec_from_flags(args, Deployment.parse(args.deployment))
    check_launch(spec.deployment.world_size, args.backend, args.timeout)
    result = execute(spec, args, spec.deployment.name)
    if result is None:  # a torchrun rank other than 0
        return 0
    m = result.metrics
    table = Table(title=f"expertmesh run: {spec.cfg.name} ({spec.cfg.dtype}), {result.deployment} "
                        f"on {result.world_size} rank(s)")
    table.add_column("metric")
    table.add_column("value", justify="right")
    rows = [("batch x prompt + generated", f"{m.batch_size} x {m.prompt_len} + {m.gen_len}"),
            ("TTFT (ms)", _ms(m.ttft_s)), ("TPOT (ms)", _ms(m.tpot_s)),
            ("prefill TPS (prompt tok/s)", _num(m.prefill_tps)),
            ("decode TPS (generated tok/s)", _num(m.decode_tps)),
            ("overall TPS (all tok/s)", _num(m.overall_tps)),
            ("parameters per rank (MiB, max)", _mib(max(result.param_bytes))),
            ("KV cache per rank (MiB, max)", _mib(max(result.kv_cache_bytes)))]
    if result.checkpoint_bytes:
        rows.append(("checkpoint read per rank (MiB, max)", _mib(max(result.checkpoint_bytes))))
    if result.load:
        rows.append(("load imbalance, max/mean rank (mean, worst)",
                     f"{result.load['imbalance_mean']:.2f}, {result.load['imbalance_max']:.2f}"))
    if result.eplb:
        e = result.eplb
        before, after = e["imbalance_before"], e["imbalance_after"]
        rows.append(("online EPLB: rebalances, imbalance before -> after",
                     f"{e['rebalances']}" + (f", {before:.2f} -> {after:.2f}" if e["rebalances"] else "")))
    if result.overflow:
        o = result.overflow
        rows.append(("capacity: rerouted / dropped assignments",
                     f"{o['rerouted']:,} / {o['dropped']:,} of {o['assignments']:,}"))
    if result.exchange:
        x = result.exchange
        rows += [("token exchange", f"{x['a2a']}, {x['nodes']} node(s) x {x['gpus_per_node']}"),
                 ("cross-node MiB per step (all ranks)", _mib(x["cross_node_bytes_per_step"]))]
    for name, value in rows:
        table.add_row(name, value)
    console.print(table)
    console.print("timings exclude a warm-up run (prompt 8, 2 tokens)", style="dim")
    _oversubscription_note(result.world_size)
    if args.show_tokens:
        for i, seq in enumerate(result.tokens.tolist()):
            console.print(f"sequence {i}: {seq}")
    if args.model and has_tokenizer(args.model):
        for i, seq in enumerate(result.tokens.tolist()):
            console.print(f"text {i}: {decode(args.model, seq)}", markup=False, highlight=False)
    if args.json:
        _write_json(args.json, {"preset": spec.cfg.to_dict(), "workload": _workload_dict(spec),
                                "result": result.to_dict()})
    _write_outputs(args, [result])
    if args.record_routing:
        Path(args.record_routing).parent.mkdir(parents=True, exist_ok=True)
        save_routing(args.record_routing, result.routing)
        console.print(f"wrote {args.record_routing}", style="dim")
    return 0


def _write_outputs(args, results: list[RunResult]) -> None:
    """The Perfetto trace of each run, when asked for (`--trace DIR`)."""
    if not args.trace:
        return
    for r in results:
        path = write_trace(Path(args.trace) / f"trace_{r.deployment}.json", r.spans)
        console.print(f"wrote {path} (open in https://ui.perfetto.dev)", style="dim")


def cmd_compare(args) -> int:
    deployments = [Deployment.parse(d) for d in args.deployments.split(",") if d.strip()]
    if not deployments:
        raise ValueError("--deployments is empty; give a comma-separated list such as tp8pp2,ep16")
    _check_outputs(args)
    any_ep = any(d.ep > 1 for d in deployments)  # else an EP-only flag is an error
    specs = [spec_from_flags(args, d, record_logits=True, ep_flags=d.ep > 1 or not any_ep) for d in deployments]
    reference_spec = spec_from_flags(args, Deployment(), record_logits=True, ep_flags=False)
    for s in specs:  # all checks first
        check_launch(s.deployment.world_size, args.backend, args.timeout)
    # Forked ranks first: a process that ran a rank itself on a GPU (single) cannot fork more.
    order = sorted(range(len(specs)), key=lambda i: specs[i].deployment.world_size == 1 and not under_torchrun())
    done = {i: execute(specs[i], args, specs[i].deployment.name) for i in order}
    results = [done[i] for i in range(len(specs))]
    if any(r is None for r in results):  # a torchrun rank other than 0
        return 0
    # The reference runs last, in this process alone, so no rank is forked from a process that
    # computed (and, under torchrun, so that it needs no process group of one).
    reference = execute(reference_spec, args, "reference", alone=True)
    exact = specs[0].cfg.dtype == "fp32" and specs[0].workload.temperature == 0
    checks = [(bool(torch.equal(r.tokens, reference.tokens)), (r.logits - reference.logits).abs().max().item())
              for r in results]
    all_match = all(match and (not exact or diff <= FP32_LOGIT_TOLERANCE) for match, diff in checks)
    _print_comparison(specs, results, checks)
    _oversubscription_note(max(r.world_size for r in results))
    if args.json:
        _write_json(args.json, {"preset": specs[0].cfg.to_dict(), "workload": _workload_dict(specs[0]),
                                "reference_tokens": reference.tokens.tolist(),
                                "results": [r.to_dict() for r in results]})
    _write_outputs(args, results)
    if not all_match:
        msg = "outputs differ from the single-process reference"
        if not exact:
            console.print(f"[yellow]note: {msg}; expected outside fp32 greedy decoding[/yellow]")
            return 0
        console.print(f"[red]error: {msg}[/red]")
        return 1
    return 0


def _print_comparison(specs: list[RunSpec], results: list, checks: list[tuple[bool, float]]) -> None:
    """The compare table (one row per deployment, with its (tokens equal, max |dlogit|) check
    against the reference) and the last deployment's ratios to the first."""
    w = specs[0].workload
    table = Table(title=f"expertmesh compare: {specs[0].cfg.name} ({specs[0].cfg.dtype}), batch "
                        f"{w.batch_size} x prompt {w.prompt_len} + {w.gen_len} generated")
    for col in ("method", "ranks", "per-rank deployment", "decode TPS", "overall TPS",
                "TPOT ms", "TTFT ms", "tokens = ref", "max |Δlogit|"):
        table.add_column(col, justify="left" if col in ("method", "per-rank deployment") else "right")
    for spec, r, (match, diff) in zip(specs, results, checks):
        m = r.metrics
        table.add_row(r.deployment, str(r.world_size), spec.deployment.describe(spec.cfg.n_experts),
                      _num(m.decode_tps), _num(m.overall_tps), _ms(m.tpot_s), _ms(m.ttft_s),
                      "yes" if match else "NO", f"{diff:.2e}")
    console.print(table)
    if len(results) >= 2:
        base, other = results[0].metrics, results[-1].metrics
        console.print(f"{results[-1].deployment} vs {results[0].deployment}: "
                      f"decode TPS x{_ratio(other.decode_tps, base.decode_tps)}, "
                      f"overall TPS x{_ratio(other.overall_tps, base.overall_tps)}, "
                      f"TPOT x{_ratio(other.tpot_s, base.tpot_s)}, TTFT x{_ratio(other.ttft_s, base.ttft_s)}")
    console.print("timings exclude a warm-up run (prompt 8, 2 tokens); reference: one process, "
                  f"same weights and prompts; logit tolerance {FP32_LOGIT_TOLERANCE:g} in fp32",
                  style="dim")


def _ratio(a: float | None, b: float | None) -> str:
    return "-" if not a or not b else f"{a / b:.2f}"


def _oversubscription_note(world_size: int) -> None:
    cores = os.cpu_count() or 1
    if world_size > cores and not torch.cuda.is_available():
        console.print(f"[yellow]note: {world_size} ranks share {cores} CPU cores, so these timings "
                      f"measure an oversubscribed CPU, not the deployments; use `expertmesh "
                      f"simulate` for GPU predictions[/yellow]")


def _workload_dict(spec: RunSpec) -> dict:
    w = spec.workload
    return {"batch_size": w.batch_size, "prompt_len": w.prompt_len, "gen_len": w.gen_len,
            "seed": w.seed, "temperature": w.temperature, "top_p": w.top_p}


def _write_json(path: str, data: dict) -> None:
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(json.dumps(data, indent=2))
    console.print(f"wrote {path}", style="dim")


class _Parser(argparse.ArgumentParser):
    """Usage mistakes as one line, like every other user error."""

    def error(self, message: str):
        print(f"error: {self.prog}: {message} (see {self.prog} --help)", file=sys.stderr)
        sys.exit(2)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="expertmesh", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="run one deployment and print its metrics")
    add_run_args(run, batch=8, prompt_len=64, gen_len=32)
    run.add_argument("--deployment", default="single", help="single, ep16, tp8pp2, ep8pp2, tp2, ...")
    run.add_argument("--show-tokens", action="store_true", help="print the generated token ids")
    run.add_argument("--record-routing", default=None,
                     help="write which experts each rank's tokens chose (input of `expertmesh place`)")
    run.set_defaults(func=cmd_run)
    compare = sub.add_parser("compare", help="run several deployments on the same workload, check "
                                             "them against the reference and print them side by side")
    add_run_args(compare, batch=16, prompt_len=32, gen_len=16)
    compare.add_argument("--deployments", default="tp8pp2,ep16",
                         help="comma-separated deployments, baseline first (default tp8pp2,ep16)")
    compare.set_defaults(func=cmd_compare)
    add_place_command(sub)
    add_profile_command(sub)
    add_server_commands(sub)
    add_simulator_commands(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except RankFailure as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:  # the ranks ignore SIGINT: the launcher stopped them on its way out
        print("error: interrupted (Ctrl-C); every rank was stopped", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
