"""Serving under load, in one run: `expertmesh serve` (single, ep2, tp2: 2 ranks on this machine)
against `transformers serve --continuous-batching` (the server a CPU user of transformers would
start), on the same random Qwen2-MoE checkpoint with a word-level tokenizer that this script
builds, driven by the same `expertmesh bench serve` load (text prompts of random words, exactly
`output_len` greedy tokens, streamed) at a light and a saturating request rate.

Each server first answers a few greedy prompts whose text must equal transformers' own greedy
decoding of the checkpoint (run here, in this process); a server that disagrees is reported as
such. Servers run one at a time, each alone on the machine. A peer that is not installed
(`pip install -e .[peers]`: transformers' serving needs fastapi, uvicorn and accelerate) is
reported as skipped with the reason.

Then the decode step time of one 48-sequence batch (48 requests at once, equal prompts and
output lengths, token ids in) with the engine alone, in this process, and behind
`expertmesh serve` (single, one API server), both read as the median gap between a request's
tokens (ITL p50: once every request decodes, one gap is one engine step). Goal: at most 1.15x.

    python benchmarks/serving.py [--quick | --smoke] [--step-time-only] [--json out.json]
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import json
import math
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

# `python benchmarks/serving.py` puts benchmarks/ first on the path, not the repository.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.peers import col, section, skipped  # noqa: E402
from expertmesh.checkpoint import config_from_hf  # noqa: E402
from expertmesh.checkpoint.tiny import reference_greedy, save_tiny_checkpoint  # noqa: E402
from expertmesh.config import Workload  # noqa: E402
from expertmesh.deployment import Deployment  # noqa: E402
from expertmesh.engine.request import Request  # noqa: E402
from expertmesh.engine.scheduler import EngineConfig  # noqa: E402
from expertmesh.engine.spec import RunSpec  # noqa: E402
from expertmesh.engine.worker import replay_rank  # noqa: E402
from expertmesh.launch import free_port  # noqa: E402
from expertmesh.server.bench import BenchConfig, run_bench, workload  # noqa: E402

TITLE = "Serving: expertmesh serve vs transformers serve --continuous-batching"
START_S = 600  # a server's start-up on a busy 2-core machine
AGREEMENT_PROMPTS = ("w5 w17 w99 w3", "w64 w2", "w11 w12 w13 w14 w15 w16 w17 w18")
AGREEMENT_TOKENS = 8
DEPLOYMENTS = ("single", "ep2", "tp2")
STEP_TITLE = "Decode step: the engine alone vs behind expertmesh serve"
STEP_GOAL = 1.15  # behind the server / alone, at most
# The engine budget of every expertmesh server here, and of the engine alone.
ENGINE = dict(kv_cache_gb=0.25, max_seqs=64, max_batched_tokens=1024)


@dataclass(frozen=True)
class Size:
    """The checkpoint (Qwen2-MoE overrides), the load, its two rates (requests/s), and the
    expertmesh deployments served."""

    model: dict
    num_prompts: int
    input_len: tuple[int, int]
    output_len: int
    rates: tuple[float, float]
    deployments: tuple[str, ...] = DEPLOYMENTS


_SMALL = dict(hidden_size=256, num_hidden_layers=4, num_attention_heads=8, num_key_value_heads=4,
              num_experts=8, moe_intermediate_size=256, shared_expert_intermediate_size=512,
              intermediate_size=512, vocab_size=1024, max_position_embeddings=1024)
SIZES = {
    "full": Size(_SMALL, num_prompts=48, input_len=(32, 128), output_len=32, rates=(1.0, math.inf)),
    "quick": Size(_SMALL, num_prompts=16, input_len=(16, 64), output_len=16, rates=(1.0, math.inf)),
    "smoke": Size({}, num_prompts=4, input_len=(4, 8), output_len=4, rates=(2.0, math.inf),
                  deployments=("single",)),
}


def peer_missing() -> str | None:
    """Why `transformers serve --continuous-batching` cannot run here, or None."""
    missing = [m for m in ("transformers", "fastapi", "uvicorn", "accelerate") if importlib.util.find_spec(m) is None]
    if missing:
        return f"{', '.join(missing)} not installed (pip install -e .[peers])"
    if shutil.which("transformers") is None:
        return "the `transformers` command is not on PATH"
    return None


class Running:
    """A server process on a free loopback port, ready once its /health answers 200."""

    def __init__(self, argv: list[str], log: Path, port: int, threads: int = os.cpu_count() or 1):
        self.url, self.log = f"http://127.0.0.1:{port}", open(log, "w")
        self.proc = subprocess.Popen(argv, stdout=self.log, stderr=subprocess.STDOUT,
                                     env={**os.environ, "OMP_NUM_THREADS": str(threads)})
        deadline = time.monotonic() + START_S
        while not self._healthy():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"{argv[:3]} did not start: {log.read_text()[-500:]}")
            time.sleep(0.5)

    def _healthy(self) -> bool:
        import httpx

        try:
            return httpx.get(self.url + "/health", timeout=5).status_code == 200
        except httpx.HTTPError:
            return False

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.log.close()


def serve_argv(ckpt: Path) -> list[str]:
    flags = [f for k, v in ENGINE.items() for f in (f"--{k.replace('_', '-')}", str(v))]
    return [sys.executable, "-m", "expertmesh.cli", "serve", "--model", str(ckpt), *flags]


def step_load(size: Size, vocab: int, url: str = "") -> BenchConfig:
    """48 requests at once, every prompt as long as the longest of the size, token ids in."""
    n = size.input_len[1]
    return BenchConfig(url=url, num_prompts=48, rate=math.inf, input_len=(n, n),
                       output_len=(size.output_len, size.output_len), vocab=vocab, seed=2)


def step_time(size: Size, workdir: Path, rounds: int = 2) -> dict:
    """ITL p50 (ms) of the 48-request batch, the engine alone and behind the server, each on one
    thread (two threads on two busy cores wait on each other's barriers), `rounds` interleaved
    runs of each after one warm-up of each; medians over the rounds."""
    import httpx

    ckpt = save_tiny_checkpoint("qwen2_moe", workdir / "qwen2moe", tokenizer=True, **size.model)
    cfg = config_from_hf(ckpt)
    load = step_load(size, cfg.vocab_size)
    arrivals = [(0, Request(i, tuple(prompt), n)) for i, (_, prompt, n) in enumerate(workload(load))]
    spec = RunSpec(cfg, Deployment(), Workload(), checkpoint=str(ckpt))
    torch.set_num_threads(1)

    def alone() -> float:
        t = replay_rank(spec, EngineConfig(**ENGINE), arrivals)
        return statistics.median(b - a for times in t.token_times.values() for a, b in zip(times, times[1:]))

    port = free_port()
    server = Running([*serve_argv(ckpt), "--port", str(port)], workdir / "step_server.log", port, threads=1)
    try:
        model = httpx.get(server.url + "/v1/models", timeout=30).json()["data"][0]["id"]
        load = dataclasses.replace(load, url=server.url + "/v1", model=model)
        alone()  # warm-ups
        run_bench(load)
        alone_s, behind_s, failed = [], [], 0
        for _ in range(rounds):
            alone_s.append(alone())
            run = run_bench(load)
            behind_s.append(run["itl_s"]["p50"])
            failed += run["failed"]
    finally:
        server.stop()
    alone_ms, behind_ms = statistics.median(alone_s) * 1e3, statistics.median(behind_s) * 1e3
    return {"alone_ms": alone_ms, "behind_ms": behind_ms, "ratio": behind_ms / alone_ms,
            "failed": failed, "load": os.getloadavg()}


def step_section(size: str) -> dict:
    if any(importlib.util.find_spec(m) is None for m in ("fastapi", "openai", "httpx", "transformers")):
        return skipped(STEP_TITLE, "ourselves", "expertmesh serve needs the serve extra (pip install -e .[serve])")
    with tempfile.TemporaryDirectory() as tmp:
        got = step_time(SIZES[size], Path(tmp), rounds=1 if size == "smoke" else 2)
    out = section(STEP_TITLE, "ourselves", rows=[{"batch": 48, **got}], setup={"size": size, "engine": ENGINE})
    out["columns"] = [col("batch", "sequences", "{}"), col("alone_ms", "engine alone, ITL p50 ms", "{:.1f}"),
                      col("behind_ms", "behind the server, ITL p50 ms", "{:.1f}"),
                      col("ratio", "behind / alone", "x{:.2f}"), col("failed", "failed", "{}")]
    out["summary"] = f"decode step time behind the server / engine alone (goal <= {STEP_GOAL})"
    out["notes"] = [f"one thread each; medians of interleaved runs; load average (1, 5, 15 min) at the "
                    f"end: {got['load']}; the load client shares the cores"]
    return out


def greedy_agrees(url: str, model: str, want: list[str]) -> bool:
    """The server's greedy texts of AGREEMENT_PROMPTS equal `want`."""
    import httpx

    got = []
    for prompt in AGREEMENT_PROMPTS:
        r = httpx.post(url + "/v1/completions", timeout=300, json={
            "model": model, "prompt": prompt, "max_tokens": AGREEMENT_TOKENS, "temperature": 0})
        r.raise_for_status()
        got.append(r.json()["choices"][0]["text"].strip())
    return got == want


def measure(size: Size, workdir: Path, progress=lambda: None) -> dict:
    import httpx
    from transformers import AutoModelForCausalLM, AutoTokenizer

    ckpt = save_tiny_checkpoint("qwen2_moe", workdir / "qwen2moe", tokenizer=True, **size.model)
    tokenizer = AutoTokenizer.from_pretrained(ckpt)
    hf = AutoModelForCausalLM.from_pretrained(ckpt, dtype=torch.float32).eval()
    want = [tokenizer.decode(reference_greedy(hf, torch.tensor([tokenizer(p).input_ids]), AGREEMENT_TOKENS)[0][0],
                             skip_special_tokens=True) for p in AGREEMENT_PROMPTS]
    del hf
    servers = {f"expertmesh {d}": [*serve_argv(ckpt), "--deployment", d] for d in size.deployments}
    reason = peer_missing()
    if reason is None:
        servers["transformers"] = ["transformers", "serve", "--continuous-batching", "--device", "cpu", str(ckpt)]
    results: dict[str, dict] = {}
    for name, argv in servers.items():
        port = free_port()
        try:
            server = Running([*argv, "--port", str(port)], workdir / f"{name.replace(' ', '_')}.log", port)
        except RuntimeError as exc:
            results[name] = {"error": str(exc)}
            continue
        try:
            model = httpx.get(server.url + "/v1/models", timeout=30).json()["data"][0]["id"]
            entry = {"greedy_agrees": greedy_agrees(server.url, model, want), "runs": {}}
            for rate in size.rates:
                cfg = BenchConfig(url=server.url + "/v1", num_prompts=size.num_prompts, rate=rate,
                                  input_len=size.input_len, output_len=(size.output_len, size.output_len),
                                  model=model, tokenizer=str(ckpt), vocab=tokenizer.vocab_size, seed=1)
                run = run_bench(cfg)
                run.pop("requests")
                entry["runs"][str(rate)] = run
                progress()
            results[name] = entry
        finally:
            server.stop()
    return {"results": results, "peer_skipped": reason, "checkpoint": size.model or "tiny defaults",
            "size": asdict(size)}


def to_section(data: dict) -> dict:
    results = data["results"]
    peer = results.get("transformers", {}).get("runs", {})
    rows = []
    for name, entry in results.items():
        if "error" in entry:
            rows.append({"server": name, "rate": "-", "agrees": entry["error"][:60]})
            continue
        for rate, run in entry["runs"].items():
            base = peer.get(rate, {}).get("output_token_throughput")
            tps = run["output_token_throughput"]
            rows.append({
                "server": name, "rate": "all at once" if rate == "inf" else f"{float(rate):g}/s",
                "agrees": "yes" if entry["greedy_agrees"] else "NO", "req_s": run["request_throughput"],
                "out_tps": tps, "ttft_ms": _ms(run["ttft_s"]["p50"]), "tpot_ms": _ms(run["tpot_s"]["p50"]),
                "itl_ms": _ms(run["itl_s"]["p50"]), "e2e_ms": _ms(run["e2e_s"]["p50"]),
                "failed": run["failed"],
                **({"ratio": tps / base} if base and name != "transformers" else {}),
            })
    size = data["size"]
    out = section(TITLE, "peers", rows=rows, setup=data)
    out["columns"] = [col("server", "server", "{}"), col("rate", "rate", "{}"), col("agrees", "greedy = HF", "{}"),
                      col("req_s", "req/s", "{:.2f}"), col("out_tps", "output tok/s", "{:,.1f}"),
                      col("ttft_ms", "TTFT p50 ms", "{:,.0f}"), col("tpot_ms", "TPOT p50 ms", "{:,.1f}"),
                      col("itl_ms", "ITL p50 ms", "{:,.1f}"), col("e2e_ms", "E2E p50 ms", "{:,.0f}"),
                      col("failed", "failed", "{}"), col("ratio", "tok/s vs transformers", "x{:.2f}")]
    out["summary"] = "output tok/s of expertmesh / transformers serve at the same rate"
    out["notes"] = [f"{size['num_prompts']} requests, prompts of {size['input_len'][0]}-{size['input_len'][1]} "
                    f"words, {size['output_len']} greedy tokens each, streamed; one run per server and rate, "
                    "p50 = median over the run's requests (ITL: over its token gaps)"]
    if data["peer_skipped"]:
        out["notes"].append(f"transformers serve skipped: {data['peer_skipped']}")
    out["plot"] = {"kind": "bar", "x": "server", "group": "rate", "y": ["out_tps"],
                   "labels": ["output tok/s"], "ylabel": "tokens/s"}
    return out


def _ms(seconds: float | None) -> float | None:
    return None if seconds is None else seconds * 1e3


def serving_section(size: str, progress=lambda: None) -> dict:
    if any(importlib.util.find_spec(m) is None for m in ("fastapi", "openai", "httpx", "transformers")):
        return skipped(TITLE, "peers", "expertmesh serve needs the serve extra (pip install -e .[serve])")
    with tempfile.TemporaryDirectory() as tmp:
        return to_section(measure(SIZES[size], Path(tmp), progress))


def steps(size: str) -> int:
    return len(SIZES[size].rates) * (len(SIZES[size].deployments) + 1)


def main(argv: list[str] | None = None) -> None:
    from rich.console import Console

    from benchmarks import report

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    which = parser.add_mutually_exclusive_group()
    which.add_argument("--quick", action="store_true")
    which.add_argument("--smoke", action="store_true")
    parser.add_argument("--step-time-only", action="store_true",
                        help="only the decode step time, alone and behind the server")
    parser.add_argument("--json", default=None, help="write the sections here")
    args = parser.parse_args(argv)
    size = "smoke" if args.smoke else "quick" if args.quick else "full"
    sections = [] if args.step_time_only else [serving_section(size)]
    sections.append(step_section(size))
    for sec in sections:
        report.render(sec, Console(width=160))
    if args.json:
        Path(args.json).write_text(json.dumps(sections, indent=2, default=str))


if __name__ == "__main__":
    main()
