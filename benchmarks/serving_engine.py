"""The serving engine measured against the static path it replaced, on this machine:

    python benchmarks/serving_engine.py [--quick] [--json FILE]

1. decode: the engine at a steady batch of B requests (one arrival, equal prompts) vs the static
   loop (`engine/generate.py`, contiguous KV cache) on the same model, batch and context, on 2
   ranks (ep2); generated tokens per second over the decode steps; goal ratio >= 0.85.
2. attention: one decode step of paged attention (the torch backend, `model/attn_backends/`, over
   blocks scattered in a pool) vs contiguous attention (rows of a preallocated cache) at 1k
   context, one process; goal ratio <= 1.15.
3. metadata: host milliseconds to build one decode step's plan (`PagedBatch`: slots, positions,
   block tables, the attention backend's per-step arrays) at 8 and 128 sequences x 10k context,
   from the sequences' block lists (as every step did before `engine/block_tables.py`) and from
   the persistent block tables; goal < 1.5 ms at 128 x 10k.
4. poisson: requests arriving as a Poisson process (random prompt and output lengths) served
   by single, ep2, tp2, pp2: TTFT and TPOT percentiles, generated and total tokens per second.
5. soak: thousands of steps of requests coming, going and aborted (one process): resident
   memory must stay flat and every KV block be free at the end.
6. prefix: prefix caching and cache-aware routing (`engine/block_pool.py`, `engine/dp_routing.py`)
   on `bench serve`'s shared-prefix workload (128 requests, each one of 16 prefixes of 1,024
   tokens drawn at random, then 16-64 tokens of its own, 4 greedy tokens; Poisson arrivals),
   with the same total KV memory on every row (ep2: half the blocks per rank, enough for half the
   prefixes): caching off and on, on single and ep2, and ep2 with load-only routing: TTFT p50,
   prompt tokens computed, hit rate. Goals: TTFT p50 >= 4x lower and prompt tokens >= 5x fewer
   with caching; hit rate >= 1.5x load-only's with cache-aware routing. Then throughput of random
   prompts (no shared prefix, one arrival) with caching on and off, interleaved: within 3%.

Repetitions are interleaved (every variant once per round) and medians reported.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import os
import random
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from expertmesh.config import Workload, preset  # noqa: E402
from expertmesh.deployment import Deployment  # noqa: E402
from expertmesh.engine.block_tables import BlockTables  # noqa: E402
from expertmesh.engine.engine import Engine  # noqa: E402
from expertmesh.engine.generate import generate  # noqa: E402
from expertmesh.engine.result import prompt_tokens  # noqa: E402
from expertmesh.engine.request import Request  # noqa: E402
from expertmesh.engine.scheduler import EngineConfig, Sequence  # noqa: E402
from expertmesh.engine.serve import serve  # noqa: E402
from expertmesh.engine.shard import load_rank  # noqa: E402
from expertmesh.engine.spec import RunSpec  # noqa: E402
from expertmesh.engine.worker import replay_rank, static_engine, static_requests  # noqa: E402
from expertmesh.launch import launch  # noqa: E402
from expertmesh.model.attention import Attention, Contiguous, KVCache  # noqa: E402
from expertmesh.model.attn_backends.torch_paged import TorchBackend  # noqa: E402
from expertmesh.model.paged import KVPool, PagedBatch, PagedView  # noqa: E402
from expertmesh.model.synthetic import materialize  # noqa: E402
from expertmesh.model.transformer import build_model  # noqa: E402
from expertmesh.server.bench import BenchConfig, workload  # noqa: E402


def decode_rank(spec: RunSpec, reps: int, device: torch.device) -> list[dict] | None:
    """Both paths `reps` times, alternating, on one model; rank 0's decode tokens per second."""
    rank = dist.get_rank()
    model, links, _ = load_rank(spec, device)
    dep, w = spec.deployment, spec.workload
    rows = dep.rows_of(rank, w.batch_size)
    prompts = w.prompts(spec.cfg)
    requests = static_requests(w, spec.cfg)
    decode_tokens = w.batch_size * (w.gen_len - 1)
    out = []
    for _ in range(reps + 1):  # the first round warms up
        dist.barrier()
        gen = generate(model, w, prompts[rows], rows, 1, links)
        static_s = gen.step_times[-1] - gen.step_times[0]
        dist.barrier()
        engine = Engine(model, spec.cfg, dep, static_engine(requests, dep), rank, links)
        t = serve(engine, [(0, r) for r in requests])
        if rank == 0:
            engine_s = t.token_times[0][-1] - t.token_times[0][0]
            out.append({"static_tps": decode_tokens / static_s, "engine_tps": decode_tokens / engine_s})
    return out[1:] if rank == 0 else None


def decode_section(quick: bool) -> dict:
    cfg = preset("small")
    B, P, G = (8, 64, 16) if quick else (16, 128, 24)
    spec = RunSpec(cfg, Deployment.parse("ep2"), Workload(batch_size=B, prompt_len=P, gen_len=G, seed=1))
    spec.validate(2)
    runs = launch(functools.partial(decode_rank, spec, 2 if quick else 3), 2, timeout=1800)
    static = statistics.median(r["static_tps"] for r in runs)
    engine = statistics.median(r["engine_tps"] for r in runs)
    return {"preset": cfg.name, "deployment": "ep2", "batch": B, "prompt_len": P, "gen_len": G,
            "static_decode_tps": static, "engine_decode_tps": engine, "ratio": engine / static,
            "goal": ">= 0.85"}


def attention_section(quick: bool) -> dict:
    cfg = preset("small")
    torch.set_num_threads(1)
    B, ctx, block = (8, 1024, 16)
    dtype = torch.float32
    attn = materialize(Attention(cfg.d_model, cfg.n_heads, cfg.n_kv_heads, cfg.head_dim, cfg.rope_theta),
                       seed=0, dtype=dtype)
    x = torch.randn(B, 1, cfg.d_model, dtype=dtype)
    cache = KVCache(B, ctx + 1, cfg.n_kv_heads, cfg.head_dim, dtype, torch.device("cpu"))
    per_seq = -(-(ctx + 1) // block)
    pool = KVPool(B * per_seq, block, cfg.n_kv_heads, cfg.head_dim, dtype, torch.device("cpu"))
    order = list(range(B * per_seq))
    random.Random(0).shuffle(order)  # blocks scattered over the pool, as after a long run
    tables = [order[i * per_seq:(i + 1) * per_seq] for i in range(B)]
    batch = PagedBatch([(ctx, 1, t) for t in tables], block, torch.device("cpu"), TorchBackend.for_device(pool.k.device, cfg.n_kv_heads * cfg.head_dim * dtype.itemsize))

    def contiguous():
        attn(x, Contiguous(cache, slice(None), ctx))

    def paged():
        attn(x.view(1, B, cfg.d_model), PagedView(pool, batch))

    times = {"contiguous": [], "paged": []}
    with torch.inference_mode():
        for _ in range(30 if quick else 200):
            for name, fn in (("contiguous", contiguous), ("paged", paged)):
                t0 = time.perf_counter()
                fn()
                times[name].append(time.perf_counter() - t0)
    c, p = statistics.median(times["contiguous"]), statistics.median(times["paged"])
    return {"preset": cfg.name, "batch": B, "context": ctx, "block_size": block, "dtype": "fp32",
            "contiguous_ms": c * 1e3, "paged_ms": p * 1e3, "ratio": p / c, "goal": "<= 1.15"}


def metadata_ms(n_seqs: int, context: int, persistent: bool, steps: int = 20) -> float:
    """Median host ms per decode step to build its plan, `steps` steps of `n_seqs` sequences
    decoding at `context`, each gaining a block every `block` steps (the torch backend as on
    CUDA: one piece; on the CPU `prepare`'s pieces add device work that CUDA runs asynchronously)."""
    block, cpu = 16, torch.device("cpu")
    per_seq = -(-(context + steps) // block)
    order = list(range(n_seqs * per_seq))
    random.Random(0).shuffle(order)
    seqs = [Sequence(Request(i, (1,), 1), i, [1] * context, computed=context - 1,
                     blocks=order[i * per_seq:i * per_seq + -(-context // block)]) for i in range(n_seqs)]
    spare = {i: order[i * per_seq + len(s.blocks):(i + 1) * per_seq] for i, s in enumerate(seqs)}
    tables, backend, times = BlockTables(), TorchBackend(), []
    for _ in range(steps):
        t0 = time.perf_counter()
        chunks = [(s.computed, 1, s.blocks) for s in seqs]
        if persistent:
            needed = [-(-(s.computed + 1) // block) for s in seqs]
            PagedBatch(chunks, block, cpu, backend, tables.plan(seqs, needed))
        else:
            PagedBatch(chunks, block, cpu, backend)
        times.append(time.perf_counter() - t0)
        for i, s in enumerate(seqs):  # the step's token is computed; the scheduler's next reservation
            s.computed += 1
            s.tokens.append(1)
            if -(-(s.computed + 1) // block) > len(s.blocks):
                s.blocks.append(spare[i].pop(0))
    return statistics.median(times[1:]) * 1e3


def metadata_section(quick: bool) -> dict:
    torch.set_num_threads(1)
    rows = []
    for n_seqs in (8, 128):
        rows.append({"sequences": n_seqs, "context": 10_000,
                     "from_lists_ms": metadata_ms(n_seqs, 10_000, persistent=False),
                     "persistent_ms": metadata_ms(n_seqs, 10_000, persistent=True)})
    return {"rows": rows, "goal": "persistent_ms < 1.5 at 128 x 10k"}


def poisson_arrivals(n: int, rate: float, vocab: int, seed: int) -> list[tuple[float, Request]]:
    rng = random.Random(seed)
    at, out = 0.0, []
    for i in range(n):
        at += rng.expovariate(rate)
        prompt = tuple(rng.randrange(vocab) for _ in range(rng.randint(16, 256)))
        out.append((at, Request(i, prompt, max_tokens=rng.randint(8, 48))))
    return out


def percentiles(values: list[float]) -> dict:
    q = statistics.quantiles(values, n=100, method="inclusive")
    return {"p50_ms": q[49] * 1e3, "p90_ms": q[89] * 1e3, "p99_ms": q[98] * 1e3}


def poisson_section(quick: bool) -> dict:
    cfg = preset("tiny")
    n, rate = (16, 8.0) if quick else (64, 8.0)
    arrivals = poisson_arrivals(n, rate, cfg.vocab_size, seed=0)
    engine = EngineConfig(block_size=16, num_blocks=512, max_batched_tokens=256, max_seqs=32)
    rows = []
    for name in ("single", "ep2", "tp2", "pp2"):
        dep = Deployment.parse(name)
        spec = RunSpec(cfg, dep, Workload(), seed=0)
        fn = functools.partial(replay_rank, spec, engine, arrivals, (), clock="time")
        if dep.world_size == 1:
            # one thread, like each rank of the others: two threads on two busy cores measured 6x
            # slower (their barriers wait on cores other processes hold)
            torch.set_num_threads(1)
            t = fn(torch.device("cpu"))
        else:
            t = launch(fn, dep.world_size, timeout=1800)
        ttft = [t.token_times[i][0] - t.submitted[i] for i in t.submitted]
        tpot = [(ts[-1] - ts[0]) / (len(ts) - 1) for ts in t.token_times.values() if len(ts) > 1]
        generated = sum(len(v) for v in t.tokens.values())
        prompt = sum(len(r.prompt) for _, r in arrivals)
        rows.append({"deployment": name, "requests": n, "rate_per_s": rate,
                     "ttft": percentiles(ttft), "tpot": percentiles(tpot),
                     "generated_tps": generated / t.elapsed, "total_tps": (generated + prompt) / t.elapsed,
                     "elapsed_s": t.elapsed})
    return {"preset": cfg.name, "rows": rows}


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def soak_section(quick: bool) -> dict:
    """Thousands of steps of requests coming and going (one process): resident memory after the
    first `settle` steps and at the end, and the pool entirely free once the stream ends."""
    cfg = preset("tiny")
    steps, settle = (300, 100) if quick else (3000, 300)
    rng = random.Random(0)
    arrivals, i = [], 0
    for step in range(steps):
        for _ in range(rng.choice((0, 0, 1, 2))):
            prompt = tuple(rng.randrange(cfg.vocab_size) for _ in range(rng.randint(1, 64)))
            arrivals.append((step, Request(i, prompt, max_tokens=rng.randint(1, 32))))
            i += 1
    aborts = [(at + 3, r.id) for at, r in arrivals[::10]]
    torch.set_num_threads(1)
    model = materialize(build_model(cfg), 0, cfg.torch_dtype, torch.device("cpu"))
    engine = Engine(model, cfg, Deployment(), EngineConfig(block_size=16, num_blocks=40,
                                                           max_batched_tokens=128, max_seqs=16))
    rss = {}

    def on_step(t) -> None:
        if t.steps in (settle, steps):
            rss[t.steps] = rss_bytes()

    t = serve(engine, arrivals, aborts, on_step=on_step)
    return {"steps": t.steps, "requests": len(arrivals), "aborted": len(aborts),
            "preemptions": engine.scheduler.preemptions, "rss_settled_mib": rss[settle] / 2**20,
            "rss_end_mib": rss[steps] / 2**20, "growth_mib": (rss[steps] - rss[settle]) / 2**20,
            "blocks_free_at_end": t.rank_stats[0].blocks_free, "blocks": engine.num_blocks}


def serve_once(spec: RunSpec, engine: EngineConfig, arrivals: list, clock: str):
    """`arrivals` served on `spec`'s deployment (local ranks, one thread each) -> the transcript."""
    fn = functools.partial(replay_rank, spec, engine, arrivals, (), clock=clock)
    if spec.deployment.world_size == 1:
        torch.set_num_threads(1)
        return fn(torch.device("cpu"))
    return launch(fn, spec.deployment.world_size, timeout=1800)


def prefix_section(quick: bool) -> dict:
    cfg = dataclasses.replace(preset("tiny"), max_seq_len=2048)
    # arrivals spread (2 requests/s): caching on keeps up on 2 busy cores, off does not
    n, prefixes, rate = (32, 8, 2.0) if quick else (128, 16, 2.0)
    bench = BenchConfig(url="-", num_prompts=n, rate=rate, input_len=(16, 64), output_len=(4, 4),
                        vocab=cfg.vocab_size, dataset="shared-prefix", prefix_len=1024, num_prefixes=prefixes)
    arrivals = [(at, Request(i, tuple(p), m)) for i, (at, p, m) in enumerate(workload(bench))]
    total_blocks = prefixes * 1024 // 16 + 32 * 80 // 16 * 2  # every prefix, and room to run
    rows = []
    for name, caching, routing in (("single", False, "cache"), ("single", True, "cache"), ("ep2", False, "load"),
                                   ("ep2", True, "load"), ("ep2", True, "cache")):
        dep = Deployment.parse(name)
        engine = EngineConfig(block_size=16, num_blocks=total_blocks // dep.dp, max_batched_tokens=512,
                              max_seqs=32, prefix_caching=caching, dp_routing=routing)
        t = serve_once(RunSpec(cfg, dep, Workload(), seed=0), engine, arrivals, "time")
        counts = prompt_tokens(t.rank_stats, dep)
        ttft = [t.token_times[i][0] - t.submitted[i] for i in t.submitted]
        rows.append({"deployment": name, "prefix_caching": caching, "dp_routing": routing if dep.dp > 1 else None,
                     "blocks_per_rank": engine.num_blocks, "ttft": percentiles(ttft),
                     "prompt_tokens": counts["total"], "prompt_tokens_computed": counts["computed"],
                     "hit_rate": counts["cached"] / counts["total"], "elapsed_s": t.elapsed})
        print(json.dumps(rows[-1]), flush=True)  # a row at a time: the whole section takes minutes
    by = {(r["deployment"], r["prefix_caching"], r["dp_routing"]): r for r in rows}
    ratios = {}
    for name, on, off in (("single", ("single", True, None), ("single", False, None)),
                          ("ep2", ("ep2", True, "cache"), ("ep2", False, "load"))):
        ratios[f"{name}_ttft_p50_off_over_on"] = by[off]["ttft"]["p50_ms"] / by[on]["ttft"]["p50_ms"]
        ratios[f"{name}_prompt_computed_off_over_on"] = (by[off]["prompt_tokens_computed"]
                                                         / by[on]["prompt_tokens_computed"])
    ratios["ep2_hit_rate_cache_over_load_routing"] = (by[("ep2", True, "cache")]["hit_rate"]
                                                      / by[("ep2", True, "load")]["hit_rate"])
    return {"preset": f"{cfg.name} (max_seq_len 2048)", "requests": n, "prefixes": prefixes, "prefix_len": 1024,
            "rate_per_s": rate, "rows": rows, "ratios": ratios,
            "no_shared_prefix": no_shared_prefix_throughput(cfg, quick)}


def no_shared_prefix_throughput(cfg, quick: bool) -> dict:
    """Random prompts of 16-256 tokens, 16 tokens each, one arrival, on one process: total
    tokens per second with caching on and off, interleaved (after one run not counted, and in
    turns first), the median of each."""
    rng = random.Random(1)
    n, reps = (16, 2) if quick else (32, 3)
    arrivals = [(0, Request(i, tuple(rng.randrange(cfg.vocab_size) for _ in range(rng.randint(16, 256))), 16))
                for i in range(n)]
    tokens = sum(len(r.prompt) + r.max_tokens for _, r in arrivals)
    spec = RunSpec(cfg, Deployment(), Workload(), seed=0)
    tps = {True: [], False: []}
    for rep in range(reps + 1):
        for caching in (True, False) if rep % 2 else (False, True):
            engine = EngineConfig(block_size=16, num_blocks=2048, max_batched_tokens=512, max_seqs=64,
                                  prefix_caching=caching)
            elapsed = serve_once(spec, engine, arrivals, "step").elapsed
            if rep:
                tps[caching].append(tokens / elapsed)
    on, off = statistics.median(tps[True]), statistics.median(tps[False])
    return {"requests": n, "reps": reps, "total_tps_on": on, "total_tps_off": off, "on_over_off": on / off,
            "goal": "on_over_off >= 0.97"}


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="smaller sizes, fewer repetitions")
    p.add_argument("--only", default="decode,attention,metadata,poisson,soak,prefix", help="sections to run")
    p.add_argument("--json", default=None, help="write the figures here")
    args = p.parse_args(argv)
    sections = {"decode": decode_section, "attention": attention_section, "metadata": metadata_section,
                "poisson": poisson_section,
                "soak": soak_section, "prefix": prefix_section}
    results = {}
    for name in args.only.split(","):
        results[name] = sections[name](args.quick)
        print(json.dumps({name: results[name]}, indent=1), flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))
    return results


if __name__ == "__main__":
    main()
