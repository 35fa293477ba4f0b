"""What the ranks of one pipeline stage do for one micro-batch of one step, as costed phases.

A stage task is `embed` (first stage) + n_layers x `layer` + `head` (last stage). A layer follows
the engine (model/attention.py, model/moe.py, parallel/*.py), per rank with t = b x L tokens:

  attention    norm, q/k/v GEMMs, rotary, KV-cache write, causal attention, output GEMM
  [tp] all-reduce of [t, D]
  moe pre      norm, router GEMM [t, E], softmax / top-k / sort
  [ep] all-to-all of the counts, then dispatch [N, D] -> experts -> combine [N, D] in chunks
  [no ep] experts over all local experts; [tp] all-reduce of [t, D]
  combine      un-permute, weighted sum, residual

Phases are `compute` (each rank on its own clock), `sync` (a collective: starts when the last
rank arrives, ends for all when the slowest is done) or an `Exchange` (the EP pipeline). A phase
with `host_sync` makes the host wait for the device (the EP count exchange, which the engine
reads on the host to size the dispatch); nothing else in a layer does.

A rank's work in one task is a tuple of segments `(b, L, start)`: b sequences, L new positions
each after `start` cached ones. A static step has one segment (the whole prefill, or one decode
position); a serving iteration mixes decode segments with a chunk of prefill.
"""

from __future__ import annotations

from dataclasses import dataclass

from expertmesh.sim import cost
from expertmesh.sim.cost import Cost
from expertmesh.sim.scenario import Scenario

# Framework ops (kernel launches on a GPU) the engine issues besides its GEMMs and attention,
# counted in its code: RMSNorm ~8 ops, rotary ~17 per call on q and k, cache writes and views,
# the router's softmax / top-k / renormalise, sorting, gathers, the combine, the residuals.
ATTENTION_OPS = 50
MOE_OPS = 30
EP_OPS = 15
HEAD_OPS = 12


Segment = tuple[int, int, float]  # (sequences, new positions each, cached positions before them)


@dataclass(frozen=True)
class Phase:
    name: str
    costs: tuple[Cost, ...]  # one per rank of the stage
    sync: bool = False
    host_sync: bool = False


@dataclass(frozen=True)
class Exchange:
    """EP dispatch -> local experts -> combine, in `chunks` equal chunks; costs per rank, per chunk."""

    dispatch: tuple[Cost, ...]
    experts: tuple[Cost, ...]
    combine: tuple[Cost, ...]
    chunks: int


@dataclass(frozen=True)
class StageProgram:
    embed: tuple
    layer: tuple
    head: tuple
    n_layers: int


def _experts(sc: Scenario, loads: list[float], tokens: float) -> Cost:
    """Grouped expert MLP over `loads[e]` rows per local expert (TP: 1/tp of the hidden units),
    the expected rows of `tokens` routed tokens. Expert e is used by some token with chance
    1 - (1 - loads[e] / tokens)^tokens: at small batches fewer weights are read than held."""
    cfg, dt, isz = sc.cfg, sc.compute_dtype, sc.itemsize
    H, D = cfg.expert_hidden // sc.deployment.tp, cfg.d_model
    rows = tuple(loads)
    used = tuple(1.0 - (1.0 - min(1.0, l / tokens)) ** tokens if tokens else 0.0 for l in loads)
    up = cost.grouped_gemm(sc.hardware, dt, isz, rows, H, D, used)
    ins = [up] * (cfg.matrices_per_expert - 1)
    act = cost.elementwise(sc.hardware, sum(loads) * H * (cfg.matrices_per_expert) * isz, 1)
    return cost.total([*ins, act, cost.grouped_gemm(sc.hardware, dt, isz, rows, D, H, used)])


def _attention(sc: Scenario, segments: tuple[Segment, ...]) -> Cost:
    cfg, hw, dt, isz = sc.cfg, sc.hardware, sc.compute_dtype, sc.itemsize
    tp, D, d = sc.deployment.tp, cfg.d_model, cfg.head_dim
    h, g, t = cfg.n_heads // tp, cfg.n_kv_heads // tp, _tokens(segments)
    # bytes of the norm, rotary on q and k, the cache write and the residual add
    moved = (2 * t * D + 2 * t * (h + g) * d + 3 * t * D) * isz + 2 * t * g * d * sc.kv_itemsize
    attn_dt = "bf16" if dt == "fp8" else dt  # the attention kernel itself stays 16-bit
    cores = [cost.attention(hw, attn_dt, isz, b, L, start, h, g, d, sc.kv_itemsize)
             for b, L, start in segments if b] or [cost.launched(hw, 1)]
    parts = [cost.elementwise(hw, moved, ATTENTION_OPS),
             cost.gemm(hw, dt, isz, t, h * d, D), cost.gemm(hw, dt, isz, t, g * d, D),
             cost.gemm(hw, dt, isz, t, g * d, D), *cores, cost.gemm(hw, dt, isz, t, D, h * d)]
    return cost.total(parts)


def _tokens(segments: tuple[Segment, ...]) -> int:
    return sum(b * L for b, L, _ in segments)


def _moe_pre(sc: Scenario, t: int) -> Cost:
    cfg, hw, isz = sc.cfg, sc.hardware, sc.itemsize
    # the router GEMM stays 16-bit (FP8 recipes keep it so)
    router_dt = "bf16" if sc.fp8 else cfg.dtype
    return cost.total([cost.elementwise(hw, 4 * t * cfg.d_model * isz, MOE_OPS),
                       cost.gemm(hw, router_dt, isz, t, cfg.n_experts, cfg.d_model)])


def _combine(sc: Scenario, t: int) -> Cost:
    """Un-permute the k results per token, weight, sum, add the residual."""
    moved = (2 * sc.cfg.top_k + 3) * t * sc.cfg.d_model * sc.itemsize
    return cost.elementwise(sc.hardware, moved, EP_OPS if sc.deployment.ep > 1 else 1)


def _collective(sc: Scenario, ranks: list[int], name: str, nbytes: list[float]) -> Phase:
    """TP all-reduce of each rank's `nbytes`, issued as one launch."""
    costs = []
    for b in nbytes:
        c = cost.all_reduce(sc.hardware, sc.topology, ranks, b)
        costs.append(c + cost.launched(sc.hardware, 1))
    return Phase(name, tuple(costs), sync=True)


def stage_program(sc: Scenario, stage: int, work: list[tuple[Segment, ...]]) -> StageProgram:
    """`work[i]`: the segments the stage's i-th rank holds in this micro-batch (or iteration)."""
    cfg, dep, hw, isz = sc.cfg, sc.deployment, sc.hardware, sc.itemsize
    ranks = list(range(stage * dep.inner, (stage + 1) * dep.inner))
    topo = sc.topology
    tokens = [_tokens(w) for w in work]
    seqs = [sum(b for b, _, _ in w) for w in work]
    D, k = cfg.d_model, cfg.top_k
    shares = sc.routing.shares(cfg.n_experts, k)
    per = cfg.n_experts // dep.ep

    layer: list = [Phase("attention", tuple(_attention(sc, w) for w in work))]
    if dep.tp > 1:
        layer.append(_collective(sc, ranks, "all-reduce", [t * D * isz for t in tokens]))
    layer.append(Phase("router", tuple(_moe_pre(sc, t) for t in tokens)))
    if dep.ep > 1:
        C = sc.a2a_chunks
        rank_share = [sum(shares[j * per:(j + 1) * per]) for j in range(dep.ep)]
        out_isz, back_isz = sc.dispatch_itemsize, isz
        send = [[t * k * rank_share[j] * D * out_isz / C for j in range(dep.ep)] for t in tokens]
        back = [[v * back_isz / out_isz for v in col] for col in zip(*send)]
        decode = all(L == 1 for w in work for _, L, _ in w)
        if sc.a2a_kernel == "low-latency" and decode:
            a2a = cost.low_latency_all_to_all
        else:
            a2a = cost.hierarchical_all_to_all if sc.hierarchical_a2a else cost.all_to_all
            counts = [[per * 8.0] * dep.ep for _ in ranks]
            layer.append(Phase("a2a counts", tuple(c + cost.launched(hw, 1) for c in
                                                   a2a(hw, topo, ranks, counts)), True, host_sync=True))
        loads = [[sum(tokens) * k * shares[j * per + e] / C for e in range(per)] for j in range(dep.ep)]
        routed = sum(tokens) / C
        layer.append(Exchange(tuple(a2a(hw, topo, ranks, send)), tuple(_experts(sc, l, routed) for l in loads),
                              tuple(a2a(hw, topo, ranks, back)), C))
    else:
        loads = [[t * k * s for s in shares] for t in tokens]
        layer.append(Phase("experts", tuple(_experts(sc, l, t) for l, t in zip(loads, tokens))))
        if dep.tp > 1:
            layer.append(_collective(sc, ranks, "all-reduce", [t * D * isz for t in tokens]))
    layer.append(Phase("combine", tuple(_combine(sc, t) for t in tokens)))

    embed, head = (), ()
    if stage == 0:
        embed = (Phase("embed", tuple(cost.elementwise(hw, 2 * t * D * isz, 1) for t in tokens)),)
    if stage == dep.pp - 1:
        # the head sees the last position of each sequence; every TP rank computes all of it
        head_dt = "bf16" if sc.fp8 else cfg.dtype
        head = (Phase("head", tuple(cost.total([
            cost.elementwise(hw, (2 * b * D + 2 * b * cfg.vocab_size) * isz, HEAD_OPS),
            cost.gemm(hw, head_dt, isz, b, cfg.vocab_size, D)]) for b in seqs)),)
    n_layers = len(dep.stage_layers(cfg.n_layers)[stage])
    return StageProgram(embed, tuple(layer), head, n_layers)
