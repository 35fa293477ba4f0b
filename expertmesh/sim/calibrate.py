"""Measure this machine into a `HardwareProfile` the simulator can load.

Each rank of a local run is one process with one thread (launch.py), so every figure is measured
the same way: matmul throughput by shape class (GEMM rows 1 .. 512), weight-streaming
memory bandwidth, gloo `all_to_all_single` and `all_reduce` at 2 .. N ranks and several sizes (fitted to
the cost model's latency + bytes / bandwidth formulas), how many ranks' compute the cores give
at once under the load they carry, and the per-op framework overhead (fitted so that the
simulator reproduces the engine's own single-rank decode step).
"""

from __future__ import annotations

import dataclasses
import functools
import os
import time

import numpy as np
import torch
import torch.distributed as dist

from expertmesh.config import Workload, preset
from expertmesh.deployment import Deployment
from expertmesh.engine.generate import generate
from expertmesh.launch import launch
from expertmesh.model.transformer import reference_model
from expertmesh.sim.hardware import HardwareProfile

ROWS = (1, 8, 64, 512)  # GEMM row classes: decode tokens .. prefill chunks
DIM = 512
SIZES = (1 << 10, 1 << 16, 1 << 20)  # collective buffers per rank, bytes


def _best(fn, repeat: int) -> float:
    """Fastest of `repeat` timed calls (after one warm-up): the least disturbed by other load."""
    fn()
    times = []
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return min(times)


def matmul_throughput(dtype: torch.dtype, repeat: int) -> dict[int, float]:
    """FLOP/s of `[m, DIM] @ [DIM, DIM]` per row class m."""
    w = torch.randn(DIM, DIM, dtype=dtype)
    out = {}
    for m in ROWS:
        x = torch.randn(m, DIM, dtype=dtype)
        out[m] = 2 * m * DIM * DIM / _best(lambda: x @ w, repeat)
    return out


def fit_gemm(throughput: dict[int, float]) -> tuple[float, float]:
    """(peak FLOP/s, half_tokens) of efficiency(m) = m / (m + half): 1 / tput(m) = a + b / m with
    peak = 1 / a, half = b / a, fitted by least squares on the *relative* error of each point.

    Absolute residuals of 1/tput would let the few-row points (1/tput large: time per call
    dominated by launch and weight reads) decide alone, driving a to zero: an unbounded peak (a
    GPU's bf16 timings, flat at ~0.1 ms up to 128 rows, gave 1e18 FLOP/s). Weighted, every row
    count counts alike; the peak is never below the best throughput measured, and where the data
    show no bend at all (a <= 0) it is that best figure."""
    m = np.array(list(throughput), dtype=float)
    tput = np.array(list(throughput.values()), dtype=float)
    a, b = np.linalg.lstsq(np.stack([np.ones_like(m), 1 / m], 1) * tput[:, None], np.ones_like(m),
                           rcond=None)[0]
    best = float(tput.max())
    peak = max(1.0 / a, best) if a > 0 else best
    # half from the fitted slope b = half / peak, at the peak kept
    return float(peak), float(max(b * peak, 1e-3))


def memory_bandwidth(repeat: int) -> float:
    """Bytes/s at which a one-row matmul streams weights that are not in cache (what decode does):
    eight 8 MiB weights, each read once per pass, more than any last-level cache holds."""
    weights = [torch.randn(2048, 1024) for _ in range(8)]
    x = torch.randn(1, 1024)

    def stream():
        for w in weights:
            x @ w.T
    return float(sum(w.nbytes for w in weights) / _best(stream, repeat))


def _matmul_seconds(n: int) -> float:
    """Wall time of n `[512, DIM] @ [DIM, DIM]` fp32 matmuls in a row."""
    x, w = torch.randn(512, DIM), torch.randn(DIM, DIM)
    t = time.perf_counter()
    for _ in range(n):
        x @ w
    return time.perf_counter() - t


def _concurrent_matmuls(device: torch.device, n: int, repeat: int) -> list[float]:
    """On every rank: the median time of n matmuls, all ranks starting together; rank 0 gets all."""
    times = []
    for _ in range(repeat):
        dist.barrier()
        times.append(_matmul_seconds(n))
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, float(np.median(times)))
    return out


def compute_slots(p: int, repeat: int, n: int = 40) -> float:
    """Ranks' worth of compute the host gives p local ranks at once (what other load leaves of
    its cores): p ranks doing the same matmuls together, against one rank alone, as
    p x alone / slowest together, between 1 and p."""
    _matmul_seconds(n)  # warm-up
    alone = float(np.median([_matmul_seconds(n) for _ in range(repeat)]))
    together = launch(functools.partial(_concurrent_matmuls, n=n, repeat=repeat), p)
    return float(min(max(p * alone / max(together), 1.0), p))


def _collectives(device: torch.device, repeat: int) -> list[tuple[str, int, int, float]]:
    """On every rank: time all_to_all_single and all_reduce per size; (op, p, bytes, s) on rank 0."""
    p = dist.get_world_size()
    rows = []
    for size in SIZES:
        x = torch.zeros(max(size // 4 // p, 1) * p)
        y = torch.empty_like(x)

        def a2a():
            dist.all_to_all_single(y, x)

        def ar():
            dist.all_reduce(x)

        for name, fn in (("all_to_all", a2a), ("all_reduce", ar)):
            dist.barrier()
            rows.append((name, p, x.nbytes, _best(fn, repeat)))
    return rows


def fit_link(samples: list[tuple[str, int, int, float]]) -> tuple[float, float]:
    """(latency s, bandwidth B/s) under cost.py's formulas: all-to-all (p-1) lat + (p-1)/p B / bw,
    ring all-reduce 2 (p-1) lat + 2 (p-1)/p B / bw; least squares over all samples."""
    A, y = [], []
    for op, p, nbytes, seconds in samples:
        f = 2 if op == "all_reduce" else 1
        A.append([f * (p - 1), f * (p - 1) / p * nbytes])
        y.append(seconds)
    lat, inv_bw = np.linalg.lstsq(np.array(A), np.array(y), rcond=None)[0]
    return float(max(lat, 0.0)), float(1.0 / max(inv_bw, 1e-15))


def fit_launch(profile: HardwareProfile, repeat: int) -> float:
    """Per-op overhead that makes the simulated TPOT of the tiny model equal the engine's own."""
    from expertmesh.sim.scenario import Scenario
    from expertmesh.sim.simulator import simulate

    cfg = preset("tiny")
    w = Workload(batch_size=2, prompt_len=16, gen_len=6)
    model = reference_model(cfg)
    prompts = w.prompts(cfg)
    tpots = []
    for _ in range(repeat):
        gen = generate(model, w, prompts, list(range(w.batch_size)))
        tpots.append((gen.step_times[-1] - gen.step_times[0]) / (w.gen_len - 1))
    measured = min(tpots)
    base = Scenario(cfg, Deployment(), w, profile.with_(launch_s=0.0))
    unit = 1e-3  # time is linear in launch_s where launches do not overlap the work
    t0 = simulate(base).metrics.tpot_s
    t1 = simulate(dataclasses.replace(base, hardware=profile.with_(launch_s=unit))).metrics.tpot_s
    return float(max((measured - t0) / (t1 - t0) * unit, 0.0))


def calibrate(max_ranks: int = 4, repeat: int = 5) -> HardwareProfile:
    """Measure this machine; `max_ranks` local gloo ranks at most for the collectives."""
    if max_ranks < 2:
        raise ValueError(f"max_ranks={max_ranks} must be at least 2 to measure collectives")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as one rank of a local run
    try:
        fp32_peak, half = fit_gemm(matmul_throughput(torch.float32, repeat))
        bf16_peak, _ = fit_gemm(matmul_throughput(torch.bfloat16, repeat))
        bandwidth = memory_bandwidth(repeat)
        samples = []
        for p in range(2, max_ranks + 1):
            samples += launch(functools.partial(_collectives, repeat=repeat), p)
        latency, link_bw = fit_link(samples)
        profile = HardwareProfile(
            name=f"CPU ({os.uname().machine}, 1 thread per rank)", bf16_flops=bf16_peak,
            fp32_flops=fp32_peak, hbm_bytes=float(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")),
            hbm_bw=bandwidth, nvlink_bw=link_bw, net_bw=link_bw, nvlink_latency_s=latency,
            net_latency_s=latency, gpus_per_node=max_ranks, launch_s=0.0, gemm_peak_efficiency=1.0,
            gemm_half_tokens=half, hbm_efficiency=1.0, launch_overlaps=False,
            compute_slots=len(os.sched_getaffinity(0)), source="calibrated")
        cores = len(os.sched_getaffinity(0))
        if cores > 1:  # other processes on the cores leave the ranks fewer of them
            profile = profile.with_(compute_slots=compute_slots(cores, repeat))
        return profile.with_(launch_s=fit_launch(profile, repeat))
    finally:
        torch.set_num_threads(threads)
