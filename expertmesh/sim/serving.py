"""Serving steady state: continuous batching on one replica, offline and under Poisson arrivals.

An iteration of a continuous-batching engine (the engine's scheduler, TensorRT-LLM's, vLLM's)
runs one forward pass over every running sequence's next token plus, within a token budget, a
chunk of waiting prompts (chunked prefill). Its time is played by the same stage programs as a
static run (program.py, simulator.py), with each rank's work as segments `(sequences, new
positions, cached positions)` (`step_seconds`): under EP each rank computes its data-parallel
rank's sequences, under TP every rank all of them. With pipeline stages, `decode_micro`
micro-batches keep the stages busy, so an iteration takes micro-batches x the slowest stage.

`offline`: every request waits from the start (trtllm-bench's throughput mode); in steady state
N sequences decode and, per iteration, N x prompt / output prompt tokens are prefilled, N
bounded by the batch cap, the token budget and the KV cache left after weights, activations and
reserve; the sequences are spread evenly over the EP ranks.

`simulate_serving`: requests arrive as a Poisson process (`stream.py`) and the engine's own
scheduler, block pool and data-parallel router decide every step (`replica.py`): admission first
come, first served while a step's token budget and the pool's blocks allow, chunked prefill,
preemption of the newest sequence when the pool runs out (its KV recomputed later), and prefix
caching (`prefix_hit_rate`: the share of each prompt that repeats a prefix other requests share;
what the pool finds of it is the engine's outcome). Each data-parallel rank's pool is its share
of the replica's KV capacity (`kv_capacity_tokens`) in the engine's 16-token blocks.
"""

from __future__ import annotations

import dataclasses
import math
from collections import defaultdict
from dataclasses import dataclass
from functools import lru_cache

from expertmesh.engine.scheduler import EngineConfig
from expertmesh.sim.memory import RESERVE_FRACTION, memory_report
from expertmesh.sim.program import Segment
from expertmesh.sim.replica import Chosen, Replica
from expertmesh.sim.scenario import Scenario
from expertmesh.sim.simulator import StageTask, control_seconds, stage_seconds
from expertmesh.sim.stream import Arrival, longest, poisson_stream

BLOCK_SIZE = EngineConfig.block_size  # tokens per KV block: the engine's default


def _split(n: float, sc: Scenario) -> list[float]:
    """Sequences (or prompts) per rank of a stage: split over EP ranks, replicated under TP."""
    dep = sc.deployment
    return [n / dep.ep] * dep.inner if dep.ep > 1 else [n] * dep.inner


def iteration_seconds(sc: Scenario, decode: float, context: float, prompts: float = 0.0,
                      prompt_len: int = 0) -> float:
    """One iteration: `decode` sequences each add one token after `context` cached ones, and
    `prompts` prompts of `prompt_len` tokens are prefilled (fractions: a chunk of a prompt),
    spread evenly over the EP ranks."""
    return step_seconds(sc, tuple((((d, 1, context),) if d else ()) + (((p, prompt_len, 0.0),) if p else ())
                                  for d, p in zip(_split(decode, sc), _split(prompts, sc))))


@lru_cache(maxsize=4096)
def step_seconds(sc: Scenario, work: tuple[tuple[Segment, ...], ...]) -> float:
    """One engine step whose stage rank i computes the segments `work[i]` (each pipeline stage
    the same), in `decode_micro` micro-batches, plus the step's control messages."""
    dep, hw = sc.deployment, sc.hw
    M = sc.micro_batches(False)
    graphs = sc.cuda_graphs and hw.launch_overlaps  # serving engines capture mixed batches too
    micro = [tuple((n / M, L, start) for n, L, start in segments) for segments in work]
    stage_time = []
    for s in range(dep.pp):
        busy = [defaultdict(float) for _ in range(dep.inner)]
        stage_time.append(stage_seconds(sc, s, micro, StageTask(dep.inner, 1.0, busy, None, hw.launch_s, graphs)))
    return (M * max(stage_time) if dep.pp > 1 else stage_time[0]) + control_seconds(sc)


def rank_kv_tokens(sc: Scenario) -> float:
    """Tokens of KV cache one data-parallel rank's pool holds (`kv_capacity_tokens` / dp)."""
    return kv_capacity_tokens(sc) / sc.deployment.dp


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
    preemptions: int = 0   # sequences preempted (their KV freed, recomputed later)
    cached_fraction: float = 0.0  # of the prompt tokens admitted, found in the prefix cache

    def percentile(self, which: str, q: float) -> float:
        values = sorted(getattr(self, which))
        return values[min(len(values) - 1, int(q / 100 * len(values)))]

    def goodput(self, ttft_slo: float | None, tpot_slo: float | None) -> float:
        """Requests per second that met both SLOs (None: no bound): the offered rate times the
        fraction that met them, so a deployment that keeps up scores the rate itself."""
        ok = sum(1 for a, b in zip(self.ttft_s, self.tpot_s)
                 if (ttft_slo is None or a <= ttft_slo) and (tpot_slo is None or b <= tpot_slo))
        return ok / max(self.arrival_span_s, 1e-12)


def simulate_serving(sc: Scenario, rate: float, prompt_len: int, output_len: int, requests: int = 200,
                     token_budget: int = 8192, max_batch: int = 2048, seed: int = 0,
                     prefix_hit_rate: float = 0.0) -> Served:
    """Poisson arrivals at `rate` requests/s per replica (`stream.py`: lengths uniform in [L/2,
    3L/2], prompts sharing `prefix_hit_rate` of their tokens), scheduled by the engine's own
    scheduler with `token_budget` tokens and `max_batch` sequences per step and data-parallel rank."""
    arrivals = poisson_stream(rate, prompt_len, output_len, requests, seed, prefix_hit_rate)
    if not holds_request(sc, prompt_len, output_len):
        raise ValueError(f"{sc.deployment.name} cannot hold the KV cache of one {longest(prompt_len, output_len)}"
                         f"-token request; use more GPUs or shorter requests")
    return replay(sc, arrivals, engine_config(sc, token_budget, max_batch))


def engine_config(sc: Scenario, token_budget: int = 8192, max_batch: int = 2048) -> EngineConfig:
    """The engine's configuration on one data-parallel rank of the scenario's replica: its share
    of the replica's KV capacity in blocks, `token_budget` tokens and `max_batch` sequences a step."""
    return EngineConfig(num_blocks=max(int(rank_kv_tokens(sc)) // BLOCK_SIZE, 1), block_size=BLOCK_SIZE,
                        max_batched_tokens=token_budget, max_seqs=max_batch)


def replay(sc: Scenario, arrivals: list[Arrival], engine: EngineConfig) -> Served:
    """Run `arrivals` (in time order) through one replica's schedulers (`replica.py`), each step
    taking `step_seconds` of its work; a step starts once the last one ended, with the requests
    that arrived by then, or at the next arrival when nothing is left to do. A request's TTFT
    runs from its arrival to the end of the step that sampled its first token, its TPOT is the
    time from then to its last token over the tokens after the first (seconds). Data-parallel
    ranks are the deployment's (`Deployment.dp`: the EP ranks); under `--attn-dp` they stay so and
    the stage program groups their work."""
    replica = Replica(sc.deployment.dp, engine)
    for a in arrivals:
        replica.check(a.request)
    arrived = {a.request.id: a.time_s for a in arrivals}
    first, ttft, tpot = {}, {}, {}
    now, nxt, delivered = 0.0, 0, 0
    while nxt < len(arrivals) or replica.has_work:
        if not replica.has_work:
            now = max(now, arrivals[nxt].time_s)
        new = []
        while nxt < len(arrivals) and arrivals[nxt].time_s <= now:
            new.append(arrivals[nxt].request)
            nxt += 1
        chosen = replica.step(new)
        now += step_seconds(sc, step_work(sc, chosen))
        for out in replica.finish(chosen):
            rid, delivered = out.request_id, delivered + 1
            if out.index == 0:
                first[rid], ttft[rid] = now, now - arrived[rid]
            if out.finished:
                tpot[rid] = (now - first[rid]) / max(out.index, 1)
    ids = [a.request.id for a in arrivals]
    totals = replica.totals()
    return Served(tuple(ttft[i] for i in ids), tuple(tpot[i] for i in ids), now - arrivals[0].time_s,
                  arrivals[-1].time_s - arrivals[0].time_s, delivered, totals["preemptions"],
                  totals["cached_tokens"] / max(totals["prompt_tokens"], 1))


def step_work(sc: Scenario, chosen: list[Chosen]) -> tuple[tuple[Segment, ...], ...]:
    """Each stage rank's segments for one step of the data-parallel ranks' `chosen`: under EP rank
    i computes data-parallel rank i's sequences, otherwise every rank of a stage all of them."""
    work = tuple(_segments(c) for c in chosen)
    return work if sc.deployment.ep > 1 else work * sc.deployment.inner


def _segments(chosen: Chosen) -> tuple[Segment, ...]:
    """One rank's sequences as at most two segments: those computing one token (decodes), at
    their mean cached length, and the prefill chunks, as chunks of the longest one's length
    (their attention over tokens cached before the chunk is not costed). Lengths are bucketed."""
    contexts = [seq.computed for seq, n in chosen if n == 1]
    chunks = [n for _, n in chosen if n > 1]
    out: tuple[Segment, ...] = ()
    if contexts:
        out += ((len(contexts), 1, float(_bucket(sum(contexts) / len(contexts)))),)
    if chunks:
        out += ((sum(chunks) / max(chunks), _bucket(max(chunks)), 0.0),)
    return out


def holds_request(sc: Scenario, prompt_len: int, output_len: int) -> bool:
    """Whether one data-parallel rank's KV pool holds the longest request `poisson_stream` may
    draw (the KV of all its tokens but the last, in whole blocks, as `Scheduler.check`)."""
    return -(-(longest(prompt_len, output_len) - 1) // BLOCK_SIZE) * BLOCK_SIZE <= rank_kv_tokens(sc)


def _bucket(n: float) -> int:
    """Round up to two significant binary digits, so iterations of similar shape share a cost."""
    if n <= 4:
        return int(math.ceil(n))
    step = 2 ** (int(math.log2(n)) - 1)
    return int(math.ceil(n / step) * step)
