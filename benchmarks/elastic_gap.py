"""The longest gap a streaming client sees across a rank's loss (`expertmesh serve --elastic`).

    python benchmarks/elastic_gap.py [--modes seed,replicas,checkpoint] [--requests 8]
                                     [--tokens 60] [--json FILE] [--logs DIR]
                                     [--deployment ep4] [--rank 2]
                                     [--hang [--hang-timeout S]]

Per mode, a real server of `--deployment` (ep4: four local CPU ranks over gloo; ep2pp2: two
pipeline stages of two) runs `--requests` greedy streams of `--tokens` tokens; once every stream
has `KILL_AFTER` tokens, rank `--rank` is SIGKILLed. Reported per
mode: the longest gap between two consecutive tokens of any stream after the kill (client-side,
time of arrival of each SSE chunk; after, not across: a loaded client reads behind the server,
so the stall can reach it a few tokens late), the longest and the median gap before it (the
noise of the machine), the recovery the server logged
(failed step to new groups with the experts in place), and whether every stream completed.
The streams' tokens are checked in tests/test_elastic.py; here only their count.

`--hang`: the rank is SIGSTOPped instead (it hangs without dying), and the server kills it once its
heartbeat is `--hang-timeout` seconds old (the server's default unless given): the gap then
holds that wait too. The stopped rank is continued and killed at the end whatever happens.

Modes: `seed`: the tiny preset, the dead rank's experts rebuilt from the seed on the survivors;
`replicas`: the tiny preset with `--redundant-experts 16` (under ep4 each rank also holds the
next rank's four experts, under ep2pp2 its stage peer's eight: nothing is loaded); `checkpoint`: a tiny-preset-sized OLMoE checkpoint (4 layers,
16 experts, d_model 256, written with `checkpoint/tiny.py`), the dead rank's experts read from
its safetensors. Every request in flight is recomputed from its prompt and streamed tokens in
all modes, so the gap includes that prefill.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx
import openai

from expertmesh.checkpoint.tiny import save_tiny_checkpoint

KILL_AFTER = 5  # tokens every stream has before the kill
START_S = 300
COMMON = ["--elastic", "--timeout", "60", "--served-model-name", "m"]


def checkpoint(folder: Path) -> Path:
    """An OLMoE checkpoint the tiny preset's size: 4 layers, 16 experts of 1024 hidden units."""
    return save_tiny_checkpoint("olmoe", folder / "olmoe", hidden_size=256, num_hidden_layers=4,
                                num_attention_heads=8, num_key_value_heads=8, num_experts=16,
                                intermediate_size=1024, vocab_size=1024, max_position_embeddings=512)


def mode_args(mode: str, folder: Path) -> list[str]:
    if mode == "seed":
        return []
    if mode == "replicas":
        return ["--redundant-experts", "16"]
    if mode == "checkpoint":
        return ["--model", str(checkpoint(folder))]
    raise ValueError(f"unknown mode {mode!r}; use seed, replicas or checkpoint")


def run_mode(mode: str, folder: Path, requests: int, tokens: int, hang: bool = False,
             hang_timeout: float | None = None, deployment: str = "ep4", rank: int = 2) -> dict:
    log_path = folder / f"{deployment}-{mode}-rank{rank}.log"
    victim = None
    extra = ["--hang-timeout", str(hang_timeout)] if hang_timeout is not None else []
    with open(log_path, "w+") as log:
        server = subprocess.Popen([sys.executable, "-m", "expertmesh.cli", "serve", "--port", "0",
                                   "--deployment", deployment, *COMMON, *mode_args(mode, folder), *extra], stdout=log,
                                  stderr=subprocess.STDOUT, env={**os.environ, "OMP_NUM_THREADS": "1"})
        try:
            deadline = time.monotonic() + START_S
            while "ready at" not in log_path.read_text():
                if server.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"the {mode} server did not start: {log_path.read_text()}")
                time.sleep(0.2)
            url = re.search(r"ready at (http://\S+)/v1", log_path.read_text()).group(1)
            client = openai.OpenAI(base_url=url + "/v1", api_key="none", max_retries=0, timeout=300)
            times = [[] for _ in range(requests)]
            errors = []

            def stream(i: int) -> None:
                prompt = [(11 * i + 3 * j) % 1000 + 1 for j in range(16)]
                try:
                    for chunk in client.completions.create(model="m", prompt=prompt, max_tokens=tokens,
                                                           temperature=0, stream=True):
                        times[i] += [time.monotonic()] * len(chunk.choices[0].token_ids or [])
                except openai.APIError as exc:
                    errors.append(exc)

            threads = [threading.Thread(target=stream, args=(i,)) for i in range(requests)]
            for t in threads:
                t.start()
            while min(len(t) for t in times) < KILL_AFTER and not errors:
                time.sleep(0.005)
            victim = httpx.get(url + "/health").json()["ranks"][rank]["pid"]
            killed = time.monotonic()
            os.kill(victim, signal.SIGSTOP if hang else signal.SIGKILL)
            for t in threads:
                t.join()
            if errors:
                raise RuntimeError(f"{len(errors)} streams failed ({errors[0]}); see {log_path}")
            after = [b - a for ts in times for a, b in zip(ts, ts[1:]) if b > killed]
            before = [b - a for ts in times for a, b in zip(ts, ts[1:]) if b <= killed]
            recovered = re.search(r"recovered in ([\d.]+) s", log_path.read_text())
            hung = re.search(rf"rank {rank} hung for ([\d.]+) s", log_path.read_text())
            return {"mode": mode, "deployment": deployment, "rank": rank, "failure": "hang" if hang else "kill", "longest_gap_s": max(after),
                    "hung_s": float(hung.group(1)) if hung else None,
                    "longest_gap_before_s": max(before), "median_gap_before_s": statistics.median(before),
                    "recovery_s": float(recovered.group(1)) if recovered else None,
                    "completed": sum(len(ts) == tokens for ts in times), "requests": requests}
        finally:
            if hang and victim is not None:  # killed by the server, else by us
                with contextlib.suppress(ProcessLookupError):
                    os.kill(victim, signal.SIGCONT)
                    os.kill(victim, signal.SIGKILL)
            server.send_signal(signal.SIGTERM)
            try:
                server.wait(60)
            except subprocess.TimeoutExpired:
                server.kill()
                server.wait()


def main(argv: list[str] | None = None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--modes", default="seed,replicas,checkpoint")
    p.add_argument("--requests", type=int, default=8)
    p.add_argument("--tokens", type=int, default=60)
    p.add_argument("--json", default=None)
    p.add_argument("--logs", default=None, help="keep each server's log (and the checkpoint) here")
    p.add_argument("--deployment", default="ep4", help="the server's deployment (ep4, ep2pp2, ...)")
    p.add_argument("--rank", type=int, default=2, help="the rank to lose (not 0: its loss ends the server)")
    p.add_argument("--hang", action="store_true", help="SIGSTOP the rank (a hang) instead of SIGKILL")
    p.add_argument("--hang-timeout", type=float, default=None, help="with --hang: the server's "
                   "--hang-timeout (default: the server's)")
    args = p.parse_args(argv)
    rows = []
    with tempfile.TemporaryDirectory(prefix="elastic-gap-") as tmp:
        folder = Path(args.logs or tmp)
        folder.mkdir(parents=True, exist_ok=True)
        for mode in args.modes.split(","):
            rows.append(run_mode(mode, folder, args.requests, args.tokens, args.hang, args.hang_timeout,
                                 args.deployment, args.rank))
            r = rows[-1]
            hung = f" (killed as hung after {r['hung_s']:.1f} s)" if r["hung_s"] is not None else ""
            print(f"{args.deployment} rank {args.rank} {mode:10s} longest gap after the {'stop' if args.hang else 'kill'}{hung} "
                  f"{r['longest_gap_s']:.3f} s; before it: longest "
                  f"{r['longest_gap_before_s']:.3f} s, median {r['median_gap_before_s']:.3f} s; "
                  f"recovery {r['recovery_s']:.3f} s, "
                  f"{r['completed']}/{r['requests']} streams complete", flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2))
    return rows


if __name__ == "__main__":
    main()
