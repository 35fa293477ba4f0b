"""The planner: every deployment of a model on a GPU count, simulated and ranked.

Candidates are every `epN`, `tpN`, `ppN`, `epNppM`, `tpNppM` whose rank count divides the GPU
count and that `Deployment.validate` accepts; the GPUs beyond one deployment run data-parallel
replicas of it. A candidate is kept when its fullest GPU holds everything it needs at its peak
and its TPOT meets the SLO; the kept ones are ranked by predicted decode throughput (by default:
overall throughput of a long-prompt batch is almost all prefill tokens, which says little about
serving) or, under a request rate, by goodput: requests per second that meet the TTFT and TPOT
SLOs in the simulated serving steady state (serving.py).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from expertmesh.config import ModelConfig
from expertmesh.deployment import Deployment
from expertmesh.sim.scenario import Scenario
from expertmesh.sim.serving import Served, holds_request, simulate_serving
from expertmesh.sim.simulator import SimResult, simulate

OBJECTIVES = ("decode", "overall", "prefill")


def candidates(cfg: ModelConfig, gpus: int) -> list[Deployment]:
    """Every valid deployment whose rank count divides `gpus`, smallest world first."""
    found = []
    for world in (n for n in range(1, gpus + 1) if gpus % n == 0):
        for pp in (p for p in range(1, world + 1) if world % p == 0):
            inner = world // pp
            for dep in {Deployment(ep=inner, pp=pp), Deployment(tp=inner, pp=pp)}:
                try:
                    dep.validate(cfg)
                except ValueError:
                    continue
                found.append(dep)
    return sorted(found, key=lambda d: (d.world_size, d.name))


@dataclass(frozen=True)
class Verdict:
    result: SimResult
    fits: bool
    meets_slo: bool

    @property
    def ok(self) -> bool:
        return self.fits and self.meets_slo


def tps(result: SimResult, objective: str) -> float:
    m = result.metrics
    return {"overall": m.overall_tps, "decode": m.decode_tps or 0.0, "prefill": m.prefill_tps}[objective]


def evaluate(base: Scenario, gpus: int, tpot_slo_s: float | None = None,
             attn_dp: int | None = None) -> list[Verdict]:
    """Simulate every candidate on `gpus` GPUs, with everything else as in `base`; EP
    candidates with attention data-parallel size `attn_dp` (those it cannot split are left out)."""
    if tpot_slo_s is not None and tpot_slo_s <= 0:
        raise ValueError(f"TPOT SLO {tpot_slo_s} s must be > 0")
    out = []
    for dep in candidates(base.cfg, gpus):
        if base.workload.batch_size < gpus // dep.world_size:
            continue  # more replicas than sequences: a smaller deployment would idle GPUs
        try:
            sc = dataclasses.replace(base, deployment=dep, gpus=gpus).with_attn_dp(attn_dp)
        except ValueError:
            continue  # attention groups of ep / attn_dp ranks do not divide the heads
        result = simulate(sc)
        tpot = result.metrics.tpot_s
        meets = tpot_slo_s is None or (tpot is not None and tpot <= tpot_slo_s)
        out.append(Verdict(result, result.memory.fits, meets))
    return out


def plan(base: Scenario, gpus: int, tpot_slo_s: float | None = None,
         objective: str = "decode") -> list[SimResult]:
    """The deployments that fit and meet the SLO, best predicted throughput first."""
    if objective not in OBJECTIVES:
        raise ValueError(f"objective {objective!r}; use one of: {', '.join(OBJECTIVES)}")
    kept = [v.result for v in evaluate(base, gpus, tpot_slo_s) if v.ok]
    return sorted(kept, key=lambda r: tps(r, objective), reverse=True)


@dataclass(frozen=True)
class Goodput:
    result: SimResult
    served: Served
    goodput: float  # requests/s meeting both SLOs, all replicas


def serve_deployment(sc: Scenario, rate: float, requests: int = 100, prefix_hit_rate: float = 0.0) -> Served:
    """The scenario's deployment serving `rate` requests/s split evenly over its replicas, with
    prompt and output lengths around the workload's, each prompt repeating `prefix_hit_rate` of
    its tokens from a prefix the requests share (`stream.py`)."""
    return simulate_serving(sc, rate / sc.replicas, sc.workload.prompt_len, sc.workload.gen_len, requests=requests,
                 prefix_hit_rate=prefix_hit_rate)


def rank_by_goodput(verdicts: list[Verdict], rate: float, ttft_slo_s: float | None,
                    tpot_slo_s: float | None, requests: int = 100,
                    prefix_hit_rate: float = 0.0) -> list[Goodput]:
    """Serve `rate` requests/s (split evenly over each candidate's replicas) of the base
    workload's prompt and output lengths; candidates that fit, best goodput first."""
    out = []
    for v in verdicts:
        sc = v.result.scenario
        if not v.fits or not holds_request(sc, sc.workload.prompt_len, sc.workload.gen_len):
            continue
        served = serve_deployment(sc, rate, requests, prefix_hit_rate)
        out.append(Goodput(v.result, served, served.goodput(ttft_slo_s, tpot_slo_s) * sc.replicas))
    # ties (every candidate keeps up) go to the lower TPOT, then TTFT, at the 90th percentile
    return sorted(out, key=lambda g: (-round(g.goodput, 6), g.served.percentile("tpot_s", 90),
                                      g.served.percentile("ttft_s", 90)))
