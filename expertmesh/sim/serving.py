"""Serving steady state: continuous batching on one replica, offline and under Poisson arrivals.

An iteration of a continuous-batching engine (the engine's scheduler, TensorRT-LLM's, vLLM's)
runs one forward pass over every running sequence's next token plus, within a token budget, a
chunk of waiting prompts (chunked prefill). Its time is played by the same stage programs as a
static run (program.py, simulator.py), with each rank's work as segments `(sequences, new
positions, cached positions)`: under EP the sequences are split over the ranks (data-parallel
attention), under TP every rank holds all of them. With pipeline stages, `decode_micro`
micro-batches keep the stages busy, so an iteration takes micro-batches x the slowest stage.

`offline`: every request waits from the start (trtllm-bench's throughput mode); in steady state
N sequences decode and, per iteration, N x prompt / output prompt tokens are prefilled, N
bounded by the batch cap, the token budget and the KV cache left after weights, activations and
reserve. `simulate_serving`: requests arrive as a Poisson process with their own prompt and
output lengths; a discrete-event loop admits them first come, first served while KV room and the
budget allow.
With a prefix cache (`prefix_hit_rate` h), each request finds the first h of its prompt cached and
prefills only the rest (at least one token); the cached part still counts against the KV room in
full (as if no two running requests shared it: conservative), and the new tokens' attention over
the cached part is not costed (small beside the MoE layers at the prompt lengths served).
"""

from __future__ import annotations

import dataclasses
import math
import random
from collections import defaultdict
from dataclasses import dataclass
from functools import lru_cache

from expertmesh.sim.memory import RESERVE_FRACTION, memory_report
from expertmesh.sim.scenario import Scenario
from expertmesh.sim.simulator import StageTask, control_seconds, stage_seconds


def _split(n: float, sc: Scenario) -> list[float]:
    """Sequences (or prompts) per rank of a stage: split over EP ranks, replicated under TP."""
    dep = sc.deployment
    return [n / dep.ep] * dep.inner if dep.ep > 1 else [n] * dep.inner


@lru_cache(maxsize=4096)
def iteration_seconds(sc: Scenario, decode: float, context: float, prompts: float = 0.0,
                      prompt_len: int = 0) -> float:
    """One iteration: `decode` sequences each add one token after `context` cached ones, and
    `prompts` prompts of `prompt_len` tokens are prefilled (fractions: a chunk of a prompt)."""
    dep, hw = sc.deployment, sc.hw
    M = sc.micro_batches(False)
    graphs = sc.cuda_graphs and hw.launch_overlaps  # serving engines capture mixed batches too
    stage_time = []
    for s in range(dep.pp):
        work = [(((d / M, 1, context),) if d else ()) + (((p / M, prompt_len, 0.0),) if p else ())
                for d, p in zip(_split(decode, sc), _split(prompts, sc))]
        busy = [defaultdict(float) for _ in range(dep.inner)]
        stage_time.append(stage_seconds(sc, s, work, StageTask(dep.inner, 1.0, busy, None, hw.launch_s, graphs)))
    return (M * max(stage_time) if dep.pp > 1 else stage_time[0]) + control_seconds(sc)


def kv_capacity_tokens(sc: Scenario, kv_fraction: float = 1.0 - RESERVE_FRACTION) -> float:
    """Tokens of KV cache one replica holds: `kv_fraction` of what its fullest rank has left
    after weights (TensorRT-LLM's kv_cache_free_gpu_mem_fraction, default 0.9), in units of the
    replica's sequences (under EP each rank holds 1/ep of them)."""
    cfg, dep = sc.cfg, sc.deployment
    one = dataclasses.replace(sc.replica_workload, batch_size=max(dep.ep, 1), prompt_len=1, gen_len=1)
    mem = memory_report(cfg, dep, one, sc.hardware.hbm_bytes, sc.weight_itemsize, sc.kv_itemsize,
                        sc.attn_tp, sc.slots)
    per_token = mem.kv_bytes / 2  # the fullest rank's bytes per token of each of its sequences
    free = kv_fraction * (sc.hardware.hbm_bytes - mem.weights_bytes)
    return max(free, 0.0) / per_token * max(dep.ep, 1)


@dataclass(frozen=True)
class Offline:
    output_tps: float     # output tokens per second, all replicas
    concurrency: float    # sequences decoding at once per replica
    iteration_s: float
    limit: str            # what capped the concurrency: "batch", "tokens" or "kv"


def offline(sc: Scenario, prompt_len: int, output_len: int, max_batch: int = 2048,
            token_budget: int = 8192) -> Offline:
    """Steady-state output throughput with every request waiting from the start."""
    per_request = 1.0 + prompt_len / output_len  # tokens processed per output token
    limits = {"batch": float(max_batch), "tokens": token_budget / per_request,
              "kv": kv_capacity_tokens(sc) / (prompt_len + output_len)}
    limit = min(limits, key=limits.get)
    n = limits[limit]
    if n < 1:
        raise ValueError(f"{sc.deployment.name} holds less than one {prompt_len + output_len}-token "
                         f"sequence in its KV cache; use more GPUs or shorter requests")
    t = iteration_seconds(sc, n, prompt_len + output_len / 2, n / output_len, prompt_len)
    return Offline(sc.replicas * n / t, n, t, limit)


@dataclass(frozen=True)
class Served:
    """Per-request latencies under load, and what was delivered."""

    ttft_s: tuple[float, ...]
    tpot_s: tuple[float, ...]
    duration_s: float     # first arrival to last completion
    arrival_span_s: float  # first to last arrival
    output_tokens: int

    def percentile(self, which: str, q: float) -> float:
        values = sorted(getattr(self, which))
        return values[min(len(values) - 1, int(q / 100 * len(values)))]

    def goodput(self, ttft_slo: float | None, tpot_slo: float | None) -> float:
        """Requests per second that met both SLOs (None: no bound): the offered rate times the
        fraction that met them, so a deployment that keeps up scores the rate itself."""
        ok = sum(1 for a, b in zip(self.ttft_s, self.tpot_s)
                 if (ttft_slo is None or a <= ttft_slo) and (tpot_slo is None or b <= tpot_slo))
        return ok / max(self.arrival_span_s, 1e-12)


@dataclass
class InFlight:
    """A request `simulate_serving` admitted: prompt tokens prefilled (or found cached), tokens
    generated, and when its first token came."""

    prefilled: int = 0
    generated: int = 0
    first_token_s: float = 0.0


def simulate_serving(sc: Scenario, rate: float, prompt_len: int, output_len: int, requests: int = 200,
          token_budget: int = 8192, max_batch: int = 2048, seed: int = 0,
          prefix_hit_rate: float = 0.0) -> Served:
    """Poisson arrivals at `rate` requests/s per replica; prompt and output lengths drawn
    uniformly in [L/2, 3L/2]; chunked prefill within `token_budget`; first come, first served
    while KV room allows (a request reserves its whole context on admission)."""
    if rate <= 0:
        raise ValueError(f"arrival rate {rate} must be > 0 requests/s")
    if not 0 <= prefix_hit_rate < 1:
        raise ValueError(f"--prefix-hit-rate {prefix_hit_rate} must be in [0, 1)")
    if not holds_request(sc, prompt_len, output_len):
        raise ValueError(f"{sc.deployment.name} cannot hold the KV cache of one {longest(prompt_len, output_len)}"
                         f"-token request; use more GPUs or shorter requests")
    rng = random.Random(seed)
    t, arrivals = 0.0, []
    for _ in range(requests):
        t += rng.expovariate(rate)
        arrivals.append((t, rng.randint(max(1, prompt_len // 2), prompt_len * 3 // 2),
                         rng.randint(max(2, output_len // 2), max(2, output_len * 3 // 2))))
    kv_room = kv_capacity_tokens(sc)
    waiting = list(range(requests))
    running: dict[int, InFlight] = {}
    ttft, tpot = [0.0] * requests, [0.0] * requests
    now, used, delivered = 0.0, 0.0, 0
    while waiting or running:
        while waiting and arrivals[waiting[0]][0] <= now and len(running) < max_batch:
            i = waiting[0]
            need = arrivals[i][1] + arrivals[i][2]
            if used + need > kv_room:
                break
            used += need
            prompt = arrivals[i][1]
            running[i] = InFlight(prefilled=min(prompt - 1, int(prefix_hit_rate * prompt)))  # cached: not computed
            waiting.pop(0)
        if not running:
            now = arrivals[waiting[0]][0]
            continue
        decoding = [i for i, r in running.items() if r.prefilled == arrivals[i][1]]
        budget = token_budget - len(decoding)
        chunks = []
        for i, r in running.items():
            if r.prefilled < arrivals[i][1] and budget > 0:
                take = min(arrivals[i][1] - r.prefilled, budget)
                chunks.append((i, take))
                budget -= take
        held = [running[i].prefilled + running[i].generated for i in decoding]  # each one's context
        context = sum(held) / len(held) if held else 0.0
        prefill_tokens = sum(c for _, c in chunks)
        chunk_len = max((c for _, c in chunks), default=0)
        now += iteration_seconds(sc, float(len(decoding)), float(_bucket(context)),
                                 prefill_tokens / chunk_len if chunk_len else 0.0, _bucket(chunk_len))
        for i in decoding:
            running[i].generated += 1
            delivered += 1
        for i, c in chunks:
            running[i].prefilled += c
            if running[i].prefilled == arrivals[i][1]:  # the prompt's last chunk yields the first token
                running[i].generated, running[i].first_token_s = 1, now
                ttft[i] = now - arrivals[i][0]
                delivered += 1
        for i in [i for i, r in running.items() if r.generated >= arrivals[i][2]]:
            r = running.pop(i)
            tpot[i] = (now - r.first_token_s) / max(arrivals[i][2] - 1, 1)
            used -= arrivals[i][1] + arrivals[i][2]
    return Served(tuple(ttft), tuple(tpot), now - arrivals[0][0], arrivals[-1][0] - arrivals[0][0], delivered)


def longest(prompt_len: int, output_len: int) -> int:
    """Tokens of the longest request `simulate_serving` draws (both lengths at 3/2 of their mean)."""
    return prompt_len * 3 // 2 + max(2, output_len * 3 // 2)


def holds_request(sc: Scenario, prompt_len: int, output_len: int) -> bool:
    """Whether one replica's KV cache holds the longest request `simulate_serving` may draw."""
    return kv_capacity_tokens(sc) >= longest(prompt_len, output_len)


def _bucket(n: float) -> int:
    """Round up to two significant binary digits, so iterations of similar shape share a cost."""
    if n <= 4:
        return int(math.ceil(n))
    step = 2 ** (int(math.log2(n)) - 1)
    return int(math.ceil(n / step) * step)
