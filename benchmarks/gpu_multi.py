"""Smoke runs for a machine with 2 or more GPUs: each multi-rank path under torchrun (two ranks, one
GPU and NCCL each), its tokens compared with `single`'s; one line per case.

    python benchmarks/gpu_multi.py                       # 2+ GPUs: NCCL, about 3 minutes
    python benchmarks/gpu_multi.py --dry-run --cases ep2 # CPU ranks over gloo: the logic

Cases: ep2, ep2 with two-batch overlap, tp2, pp2, hierarchical exchange with `--gpus-per-node 1`
(two "nodes" of one GPU: the cross-node path), and `serve` ep2 answering one request (its token ids
against `serve` single's). Every run is `preset small` (`tiny` in a dry run) in fp32 with greedy
decoding, where every deployment must give the reference's tokens exactly. Each case's stderr goes
to OUT/CASE.log. Exit code 0 when every case matched.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RUNS = {
    "ep2": ["--deployment", "ep2"],
    "ep2 tbo": ["--deployment", "ep2", "--overlap", "tbo"],
    "tp2": ["--deployment", "tp2"],
    "pp2": ["--deployment", "pp2"],
    "hierarchical": ["--deployment", "ep2", "--a2a", "hierarchical", "--gpus-per-node", "1"],
}
CASES = (*RUNS, "serve ep2")
PROMPT = [3, 14, 15, 92, 65, 35, 89, 79]
SERVE_START_S = 300.0


def torchrun(nproc: int) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}"]


def model_flags(dry_run: bool) -> list[str]:
    return ["--preset", "tiny" if dry_run else "small", "--dtype", "fp32", "--seed", "0"]


def _run(cmd: list[str], log: Path, timeout: float) -> int:
    with open(log, "ab") as err:
        return subprocess.run(cmd, cwd=ROOT, stdout=err, stderr=err, timeout=timeout).returncode


def _last_line(log: Path) -> str:
    lines = [ln for ln in log.read_text(errors="replace").splitlines() if ln.strip()]
    return next((ln for ln in reversed(lines) if ln.startswith("error")), lines[-1] if lines else "no output")


def run_case(name: str, args: list[str], common: list[str], out: Path, reference: list, timeout: float) -> str:
    """One torchrun `run`, its tokens against the reference's: the case's line."""
    result, log = out / f"{name.replace(' ', '_')}.json", out / f"{name.replace(' ', '_')}.log"
    t0 = time.perf_counter()
    code = _run([*torchrun(2), "-m", "expertmesh.cli", "run", *common, *args, "--json", str(result)],
                log, timeout)
    took = time.perf_counter() - t0
    if code != 0 or not result.exists():
        return f"{name}: FAILED, exit {code} ({_last_line(log)})"
    tokens = json.loads(result.read_text())["result"]["tokens"]
    return f"{name}: tokens {'= single' if tokens == reference else 'DIFFER from single'} ({took:.0f} s)"


def _get(url: str) -> dict:
    with urllib.request.urlopen(url, timeout=5) as r:
        return json.loads(r.read())


def serve_tokens(cmd: list[str], port: int, log: Path) -> list[int]:
    """Start a server, wait for /health, ask for one greedy completion, stop it: its token ids."""
    with open(log, "ab") as err:
        proc = subprocess.Popen(cmd, cwd=ROOT, stdout=err, stderr=err, start_new_session=True)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + SERVE_START_S
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"the server exited with {proc.returncode} ({_last_line(log)})")
            try:
                _get(base + "/health")
                break
            except OSError:
                if time.monotonic() > deadline:
                    raise RuntimeError(f"no /health within {SERVE_START_S:.0f} s") from None
                time.sleep(1.0)
        model = _get(base + "/v1/models")["data"][0]["id"]
        body = json.dumps({"model": model, "prompt": PROMPT, "max_tokens": 8, "temperature": 0}).encode()
        request = urllib.request.Request(base + "/v1/completions", body, {"Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=120) as r:
            return json.loads(r.read())["choices"][0]["token_ids"]
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)  # the server (or torchrun's agent) and its ranks
            try:
                proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()


def serve_case(common: list[str], out: Path) -> str:
    from expertmesh.launch import free_port

    log = out / "serve_ep2.log"
    flags = ["-m", "expertmesh.cli", "serve", *common, "--num-blocks", "64"]
    t0 = time.perf_counter()
    try:
        port = free_port()
        reference = serve_tokens([sys.executable, *flags, "--port", str(port)], port, log)
        port = free_port()
        tokens = serve_tokens([*torchrun(2), *flags, "--deployment", "ep2", "--port", str(port)], port, log)
    except (RuntimeError, OSError) as exc:
        return f"serve ep2: FAILED ({exc})"
    verdict = "= single" if tokens == reference else f"DIFFER from single ({tokens} vs {reference})"
    return f"serve ep2: token ids {verdict} ({time.perf_counter() - t0:.0f} s)"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog="\n".join(__doc__.splitlines()[2:]))
    parser.add_argument("--out", default="gpu-multi", help="folder for each case's JSON and log")
    parser.add_argument("--dry-run", action="store_true", help="CPU ranks over gloo, the tiny preset")
    parser.add_argument("--cases", default=",".join(CASES), help=f"comma-separated, of: {', '.join(CASES)}")
    parser.add_argument("--timeout", type=float, default=600.0, help="seconds per case")
    args = parser.parse_args(argv)
    cases = [c.strip() for c in args.cases.split(",") if c.strip()]
    unknown = [c for c in cases if c not in CASES]
    if unknown:
        parser.error(f"unknown cases {unknown}; choose from {list(CASES)}")
    if not args.dry_run:
        import torch
        if torch.cuda.device_count() < 2:
            print("error: gpu_multi needs 2 GPUs (this machine has "
                  f"{torch.cuda.device_count()}); --dry-run runs the cases on the CPU", file=sys.stderr)
            return 2
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    backend = ["--backend", "gloo" if args.dry_run else "nccl"]
    common = [*model_flags(args.dry_run), *backend, "--timeout", str(args.timeout)]
    workload = ["--batch", "4", "--prompt-len", "16", "--gen-len", "8"]
    lines = []
    if any(c in RUNS for c in cases):
        ref_json, log = out / "single.json", out / "single.log"
        single_backend = ["--backend", "gloo"] if args.dry_run else []  # single on cuda:0
        code = _run([sys.executable, "-m", "expertmesh.cli", "run", *model_flags(args.dry_run), *single_backend,
                     *workload, "--deployment", "single", "--json", str(ref_json)], log, args.timeout)
        if code != 0:
            print(f"single: FAILED, exit {code} ({_last_line(log)})")
            return 1
        reference = json.loads(ref_json.read_text())["result"]["tokens"]
        for name in (c for c in cases if c in RUNS):
            lines.append(run_case(name, RUNS[name], [*common, *workload], out, reference, args.timeout))
            print(lines[-1], flush=True)
    if "serve ep2" in cases:
        lines.append(serve_case(common, out))
        print(lines[-1], flush=True)
    return 0 if all("= single" in line for line in lines) else 1


if __name__ == "__main__":
    sys.exit(main())
