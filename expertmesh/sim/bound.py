"""Roofline lower bound of a run: the time its FLOPs, HBM bytes and link bytes need at peak.

Volumes are counted from the model, the deployment and the workload alone (not from the
simulator's schedule), for one replica over its `world_size` GPUs, each at the datasheet peak:
no efficiency loss, no latency, perfect overlap. Minimal HBM traffic per forward pass: each
weight copy that computes is read once (attention, dense layers' MLP and the head are replicated
on EP ranks, the head on TP ranks), each expert that some token chose is read once (expected number under the
routing), the cached K and V (latent attention: the latent) are read once; under EP with attention
TP, one attention copy per group. A run cannot be faster than the slowest resource.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from expertmesh.sim.memory import attention_params
from expertmesh.sim.scenario import Scenario

RESOURCE_NAMES = ("compute", "hbm", "nvlink", "network")


def pass_volumes(sc: Scenario, L: int, start: float) -> dict[str, float]:
    """FLOPs and bytes of one forward pass of the replica's batch, L new positions after `start`."""
    cfg, dep, w, topo, isz = sc.cfg, sc.deployment, sc.replica_workload, sc.topology, sc.itemsize
    B, D, d, k, inner = w.batch_size, cfg.d_model, cfg.head_dim, cfg.top_k, dep.inner
    h, H, E, V = cfg.n_heads, cfg.expert_hidden, cfg.n_experts, cfg.vocab_size
    t = B * L
    proj = attention_params(cfg, 1)
    d = cfg.kv_per_token()[1]  # latent attention: the latent's width, one head
    expert = cfg.matrices_per_expert * D * H
    shares = sc.routing.shares(E, k)
    used = sum(1 - (1 - min(1.0, k * s)) ** t for s in shares)
    pairs = B * (L * start + L * (L + 1) / 2)

    n_dense = len(cfg.dense_layers)
    n_moe, dense = cfg.n_layers - n_dense, 3 * D * cfg.dense_hidden  # dense layers' MLP: every token
    flops = cfg.n_layers * (2 * t * proj + 4 * h * d * pairs)
    flops += n_moe * (2 * t * D * E + 2 * t * k * expert) + n_dense * 2 * t * dense + 2 * B * D * V
    a = sc.attn_tp if dep.ep > 1 else 1  # attention TP inside EP: one copy per attention group
    weights = cfg.n_layers * proj * min(dep.ep // a, B) + n_moe * (E * D * min(dep.ep, B) + used * expert)
    weights += n_dense * dense * min(dep.ep, B) + V * D * dep.tp + V * D
    kv = cfg.n_layers * B * (start + L) * cfg.kv_elements_per_token()
    out = {"compute": flops, "hbm": weights * sc.weight_itemsize + kv * sc.kv_itemsize,
           "nvlink": 0.0, "network": 0.0}

    def move(a: int, b: int, nbytes: float) -> None:
        out["network" if topo.node_of(a) != topo.node_of(b) else "nvlink"] += nbytes

    for s in range(dep.pp):
        ranks = range(s * inner, (s + 1) * inner)
        layers = len(dep.stage_layers(cfg.n_layers)[s])
        moe_layers = sum(not cfg.is_dense(i) for i in dep.stage_layers(cfg.n_layers)[s])
        if dep.tp > 1:  # two ring all-reduces of [t, D] per layer, 2 (p-1)/p of it sent per rank
            ring = list(ranks)
            for i, r in enumerate(ring):
                move(r, ring[(i + 1) % len(ring)], layers * 2 * 2 * (dep.tp - 1) / dep.tp * t * D * isz)
        if a > 1:  # reduce-scatter and all-gather of each attention group's [t_g, D], as a ring
            for g in range(0, inner, a):
                group = list(ranks)[g:g + a]
                t_g = sum(len(dep.rows_of(r, B)) for r in group) * L
                for i, r in enumerate(group):
                    move(r, group[(i + 1) % a], layers * 2 * (a - 1) / a * t_g * D * isz)
        if dep.ep > 1:  # dispatch and combine of every assignment whose expert is on another rank
            rank_share = sc.rank_shares()
            for i, r in enumerate(ranks):
                tokens = len(dep.rows_of(r, B)) * L
                for j, q in enumerate(ranks):
                    if i != j:
                        move(r, q, moe_layers * tokens * k * rank_share[j] * D
                             * (sc.dispatch_itemsize + isz))
        if s < dep.pp - 1:
            move(s * inner, (s + 1) * inner, t * D * isz)
    return out


@dataclass(frozen=True)
class Bound:
    """Lower bounds in seconds, each with the resource that sets it."""

    ttft_s: float
    ttft_resource: str
    tpot_s: float | None
    tpot_resource: str | None
    total_s: float
    total_resource: str

    def to_dict(self) -> dict:
        return asdict(self)


def _seconds(sc: Scenario, volumes: dict[str, float], achieved: bool) -> tuple[float, str]:
    hw, n = sc.hw, sc.deployment.world_size
    capacity = {"compute": hw.matmul_flops(sc.compute_dtype), "hbm": hw.hbm_bw,
                "nvlink": hw.nvlink_bw, "network": hw.net_bw}
    if achieved:  # what measured kernels reach, not the datasheet
        for res, eff in (("compute", hw.matmul_efficiency(sc.compute_dtype)), ("hbm", hw.hbm_efficiency),
                         ("nvlink", hw.nvlink_efficiency), ("network", hw.net_efficiency)):
            capacity[res] *= eff
    times = {res: volumes[res] / (n * capacity[res]) for res in RESOURCE_NAMES}
    resource = max(times, key=times.get)
    return times[resource], resource


def roofline(sc: Scenario, achieved: bool = False) -> Bound:
    """Bounds on TTFT (the prefill pass), TPOT (the mean decode pass) and the whole run, at the
    datasheet peaks or (`achieved`) at the fraction of them that published kernels reach."""
    w = sc.workload
    prefill = pass_volumes(sc, w.prompt_len, 0)
    ttft, ttft_res = _seconds(sc, prefill, achieved)
    if w.gen_len == 1:
        return Bound(ttft, ttft_res, None, None, ttft, ttft_res)
    # decode steps 1 .. G-1 start at P .. P+G-2; volumes are linear in the start, so the mean
    # step is the step at the mean start
    decode = pass_volumes(sc, 1, w.prompt_len + (w.gen_len - 2) / 2)
    tpot, tpot_res = _seconds(sc, decode, achieved)
    whole = {res: prefill[res] + (w.gen_len - 1) * decode[res] for res in RESOURCE_NAMES}
    total, total_res = _seconds(sc, whole, achieved)
    return Bound(ttft, ttft_res, tpot, tpot_res, total, total_res)
