"""What the ranks of one pipeline stage do for one micro-batch of one step, as costed phases.

A stage task is `embed` (first stage) + n_layers x `layer` + n_dense x `dense` + `head` (last
stage). An MoE layer follows
the engine (model/attention.py, model/moe.py, parallel/*.py), per rank with t = b x L tokens:

  attention    norm, q/k/v GEMMs, rotary, KV-cache write, causal attention, output GEMM
  [tp] all-reduce of [t, D]
  [ep, attention TP a = ep / attn_dp > 1] reduce-scatter of the group's [t_g, D]: t_g / a each
  moe pre      norm, router GEMM [t, E], softmax / top-k / sort
  [ep] standard exchange: all-to-all of the counts (the host waits), then dispatch [N, D] ->
       experts -> combine [N, D] in chunks; or, when every rank has at most
       `low_latency_tokens` tokens, the low-latency exchange: one fixed-size message per
       direction (cap = M min(k, El) rows to every peer, M the largest rank's tokens), no count
       exchange, no host sync
  [no ep] experts over all local experts; [tp] all-reduce of [t, D]
  combine      un-permute, weighted sum, residual
  [ep, attention TP] all-gather of the group's [t_g, D]

A dense layer (the config's `dense_layers`, Qwen3-MoE's MLP-only layers) has the same attention
phases, then the dense SwiGLU MLP over the rank's t tokens (gate, up, down GEMMs of hidden F / tp;
replicated under EP, so no exchange), [tp] all-reduce of [t, D], and the residual add.

A stage task under EP with a low-latency threshold starts with the engine's exchange choice: one
all-reduce of an int over the EP group's host processes (gloo), once per forward that does not
only decode (a decode step's plan comes with rank 0's step message).

Phases are `compute` (each rank on its own clock), `sync` (a collective: starts when the last
rank arrives, ends for all when the slowest is done) or an `Exchange` (the EP pipeline). A phase
with `host_sync` makes the host wait for the device (the EP count exchange, which the engine
reads on the host to size the dispatch); nothing else in a layer does.

A rank's work in one task is a tuple of segments `(b, L, start)`: b sequences, L new positions
each after `start` cached ones. A static step has one segment (the whole prefill, or one decode
position); a serving iteration mixes decode segments with a chunk of prefill.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

from expertmesh.sim import cost
from expertmesh.sim.cost import Cost
from expertmesh.sim.scenario import Scenario

# Framework ops (kernel launches on a GPU) the engine issues per decode layer besides the ones
# costed on their own (q, k, v, o projections, the attention core, the router GEMM, the expert
# GEMMs and activation), as built: `expertmesh profile --preset small` counts 40 aten ops per
# layer on `single` and 56 on ep2 with the low-latency exchange (this branch with RoPE tables
# once per step, op_count.py); attention's side (norm, rotary, KV write and gather, residual) is
# about 25 of them, the MoE side 11 + the combine, the EP exchange 16 more than the local path.
ATTENTION_OPS = 20
MOE_OPS = 11
EP_OPS = 16
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
    """EP dispatch -> local experts -> combine, in `chunks` equal chunks; costs per rank, per chunk.
    `overlapped`: chunk i+1's dispatch in flight while chunk i computes (else one after another)."""

    dispatch: tuple[Cost, ...]
    experts: tuple[Cost, ...]
    combine: tuple[Cost, ...]
    chunks: int
    overlapped: bool = True


@dataclass(frozen=True)
class StageProgram:
    """`layer`: an MoE layer's phases, played `n_layers` times; `dense`: a dense layer's, played
    `n_dense` times."""

    embed: tuple
    layer: tuple
    head: tuple
    n_layers: int
    dense: tuple = ()
    n_dense: int = 0


def _experts(sc: Scenario, loads: list[float], tokens: float) -> Cost:
    """Grouped expert MLP over `loads[e]` rows per local expert (TP: 1/tp of the hidden units),
    the expected rows of `tokens` routed tokens. Expert e is used by some token with chance
    1 - (1 - loads[e] / tokens)^tokens: at small batches fewer weights are read than held."""
    cfg, dt, isz = sc.cfg, sc.compute_dtype, sc.itemsize
    H, D = cfg.expert_hidden // sc.deployment.tp, cfg.d_model
    rows = tuple(loads)
    used = tuple(1.0 - (1.0 - min(1.0, l / tokens)) ** tokens if tokens else 0.0 for l in loads)
    up = cost.grouped_gemm(sc.hw, dt, isz, rows, H, D, used)
    ins = [up] * (cfg.matrices_per_expert - 1)
    act = cost.elementwise(sc.hw, sum(loads) * H * (cfg.matrices_per_expert) * isz, 1)
    return cost.total([*ins, act, cost.grouped_gemm(sc.hw, dt, isz, rows, D, H, used)])


def _latent_attention(sc: Scenario, segments: tuple[Segment, ...]) -> Cost:
    """Latent attention as `model/mla.py` runs it: the query (low-rank pair or one GEMM), the
    latent's GEMM, then either (a forward over cached positions) the query absorbed into the
    latent (W_uk), multi-query attention over the cached latent `r + p` wide and W_uv on its
    output, or (no segment with cached positions: a fresh prefill) the latent expanded by kv_b to
    per-head keys `n + p` and values `v` and multi-head attention over them; the output GEMM."""
    cfg, hw, dt, isz = sc.cfg, sc.hw, sc.compute_dtype, sc.itemsize
    D, d, p, v = cfg.d_model, cfg.head_dim, cfg.qk_rope_head_dim, cfg.v_head_dim
    r, ql = cfg.kv_lora_rank, cfg.q_lora_rank
    h, t = cfg.n_heads // sc.attn_tp, _tokens(segments)
    query = ([cost.gemm(hw, dt, isz, t, ql, D), cost.gemm(hw, dt, isz, t, h * d, ql)] if ql
             else [cost.gemm(hw, dt, isz, t, h * d, D)])
    # the latent is written to the cache once (a keys-only pool)
    moved = (5 * t * D + 2 * t * h * (d + r + p)) * isz + t * (r + p) * sc.kv_itemsize
    attn_dt = "bf16" if dt == "fp8" else dt
    if all(start == 0 for b, _, start in segments if b):
        # keys d wide, values v: the cost model's one head width is their mean (exact FLOPs)
        cores = [cost.attention(hw, attn_dt, isz, b, L, 0, h, h, (d + v) // 2) for b, L, _ in segments if b]
        inner = [cost.gemm(hw, dt, isz, t, h * (d - p + v), r), *(cores or [cost.launched(hw, 1)])]
        moved += 2 * t * h * (d + v) * isz  # the expanded keys and values, written then read
    else:
        cores = [cost.attention(hw, attn_dt, isz, b, L, start, h, 1, r + p, sc.kv_itemsize)
                 for b, L, start in segments if b] or [cost.launched(hw, 1)]
        inner = [cost.gemm(hw, dt, isz, t, h * r, d - p), *cores, cost.gemm(hw, dt, isz, t, h * v, r)]
    return cost.total([cost.elementwise(hw, moved, ATTENTION_OPS), *query,
                       cost.gemm(hw, dt, isz, t, r + p, D), *inner, cost.gemm(hw, dt, isz, t, D, h * v)])


def _attention(sc: Scenario, segments: tuple[Segment, ...]) -> Cost:
    cfg, hw, dt, isz = sc.cfg, sc.hw, sc.compute_dtype, sc.itemsize
    if cfg.kv_lora_rank:
        return _latent_attention(sc, segments)
    tp, D, d = sc.attn_tp, cfg.d_model, cfg.head_dim
    h, g, t = cfg.n_heads // tp, cfg.n_kv_heads // tp, _tokens(segments)
    # bytes of the norm, rotary on q and k, the cache write and the residual add
    moved = (2 * t * D + 2 * t * (h + g) * d + 3 * t * D) * isz + 2 * t * g * d * sc.kv_itemsize
    attn_dt = "bf16" if dt == "fp8" else dt  # the attention kernel itself stays 16-bit
    cores = [cost.attention(hw, attn_dt, isz, b, L, start, h, g, d, sc.kv_itemsize)
             for b, L, start in segments if b] or [cost.launched(hw, 1)]
    if sc.attention_backend == "torch":  # the gather's copy of K and V: written, then read
        cached = sum(b * (start + L) for b, L, start in segments)
        cores.append(cost.elementwise(hw, 2 * 2 * cached * g * d * sc.kv_itemsize, 2))
    parts = [cost.elementwise(hw, moved, ATTENTION_OPS),
             cost.gemm(hw, dt, isz, t, h * d, D), cost.gemm(hw, dt, isz, t, g * d, D),
             cost.gemm(hw, dt, isz, t, g * d, D), *cores, cost.gemm(hw, dt, isz, t, D, h * d)]
    return cost.total(parts)


def _dense_mlp(sc: Scenario, t: float) -> Cost:
    """down(silu(gate(x)) * up(x)) over `t` tokens, hidden F / tp."""
    cfg, hw, dt, isz = sc.cfg, sc.hw, sc.compute_dtype, sc.itemsize
    F, D = cfg.dense_hidden // sc.deployment.tp, cfg.d_model
    up = cost.gemm(hw, dt, isz, t, F, D)
    act = cost.elementwise(hw, 3 * t * F * isz, 1)
    return cost.total([up, up, act, cost.gemm(hw, dt, isz, t, D, F)])


def _tokens(segments: tuple[Segment, ...]) -> int:
    return sum(b * L for b, L, _ in segments)


def _moe_pre(sc: Scenario, t: int) -> Cost:
    cfg, hw, isz = sc.cfg, sc.hw, sc.itemsize
    # the router GEMM stays 16-bit (FP8 recipes keep it so)
    router_dt = "bf16" if sc.fp8 else cfg.dtype
    return cost.total([cost.elementwise(hw, 4 * t * cfg.d_model * isz, MOE_OPS),
                       cost.gemm(hw, router_dt, isz, t, cfg.n_experts, cfg.d_model)])


def _combine(sc: Scenario, t: int) -> Cost:
    """Un-permute the k results per token, weight, sum, add the residual."""
    moved = (2 * sc.cfg.top_k + 3) * t * sc.cfg.d_model * sc.itemsize
    return cost.elementwise(sc.hw, moved, EP_OPS if sc.deployment.ep > 1 else 1)


def _collective(sc: Scenario, ranks: list[int], name: str, nbytes: list[float]) -> Phase:
    """TP all-reduce of each rank's `nbytes`, issued as one launch."""
    costs = []
    for b in nbytes:
        c = cost.all_reduce(sc.hw, sc.topology, ranks, b)
        costs.append(c + cost.launched(sc.hw, 1))
    return Phase(name, tuple(costs), sync=True)


def _group_phase(sc: Scenario, groups: list[list[int]], name: str, nbytes: list[float]) -> Phase:
    """Reduce-scatter or all-gather of each group's `nbytes` buffer inside its attention group."""
    first = groups[0][0]  # nbytes is indexed by the rank's place in the stage
    costs = [cost.all_gather(sc.hw, sc.topology, g, nbytes[i - first]) + cost.launched(sc.hw, 1)
             for g in groups for i in g]
    return Phase(name, tuple(costs), sync=True)


def _ep_exchange(sc: Scenario, ranks: list[int], tokens: list[float], most: float) -> list:
    """The EP exchange of one layer for `tokens[i]` tokens on the stage's i-th rank, planned for
    `most` tokens on the busiest rank: the count exchange (standard path only) and the Exchange."""
    cfg, hw, topo = sc.cfg, sc.hw, sc.topology
    D, k, placement = cfg.d_model, cfg.top_k, sc.expert_placement
    shares = sc.routing.shares(cfg.n_experts, k)
    copies = Counter(e for experts in placement for e in experts)  # a replica takes its share
    low = sc.low_latency(most)
    C = 1 if low or sc.overlap in ("tbo", "auto") else sc.a2a_chunks
    rank_share = sc.rank_shares()
    out_isz, back_isz = sc.dispatch_itemsize, sc.itemsize
    send = [[t * k * share * D * out_isz / C for share in rank_share] for t in tokens]
    phases: list = []
    if low and sc.a2a_kernel == "low-latency":
        a2a = cost.low_latency_all_to_all  # the kernel sends only the real rows
    elif low:  # the engine's: fixed-size buffers, padding included, counts in front
        send = [[most * min(k, len(x)) * D * out_isz + len(x) * 4 for x in placement] for _ in tokens]
        a2a = cost.all_to_all
    else:
        a2a = cost.hierarchical_all_to_all if sc.hierarchical_a2a else cost.all_to_all
        counts = [[len(x) * 8.0 for x in placement] for _ in ranks]
        phases.append(Phase("a2a counts", tuple(c + cost.launched(hw, 1) for c in a2a(hw, topo, ranks, counts)),
                            True, host_sync=True))
    back = [[v * back_isz / out_isz for v in col] for col in zip(*send)]
    loads = [[sum(tokens) * k * shares[e] / copies[e] / C for e in experts] for experts in placement]
    routed = sum(tokens) / C
    phases.append(Exchange(tuple(a2a(hw, topo, ranks, send)), tuple(_experts(sc, l, routed) for l in loads),
                           tuple(a2a(hw, topo, ranks, back)), C, overlapped=sc.overlap != "none"))
    return phases


def exchange_choice(sc: Scenario, ranks: list[int]) -> Phase:
    """The engine's agreement on the exchange of a forward that does not only decode (a decode
    step's message from rank 0 bounds every rank's tokens): an all-reduce (MAX) of an int over
    the EP group's host processes, 2 (p - 1) messages of a ring, on the host."""
    c = cost.host_messages(sc.hw, sc.topology, ranks, 2 * (len(ranks) - 1))
    return Phase("exchange choice", (c,) * len(ranks), sync=True)


def _groups(sc: Scenario, work: list[tuple[Segment, ...]]) -> list[tuple[Segment, ...]]:
    """Under EP with attention TP (a = ep / attn_dp ranks a group), each rank's group's segments
    (every rank of a group runs attention over all of them); else each rank's own."""
    a = sc.attn_tp if sc.deployment.ep > 1 else 1
    return [sum(work[g:g + a], ()) for g in range(0, len(work), a) for _ in range(a)]


def _dispatched(sc: Scenario, work: list[tuple[Segment, ...]]) -> list[float]:
    """Tokens each rank routes through the MoE: its own, or an equal share of its group's."""
    a = sc.attn_tp if sc.deployment.ep > 1 else 1
    return [_tokens(w) / a for w in _groups(sc, work)]


def stage_program(sc: Scenario, stage: int, work: list[tuple[Segment, ...]],
                  plan_work: list[tuple[Segment, ...]] | None = None) -> StageProgram:
    """`work[i]`: the segments the stage's i-th rank holds in this micro-batch (or iteration);
    under EP with attention TP, a group's ranks each run attention over all the group's
    sequences (a share of the heads) and dispatch an equal share of its tokens. `plan_work`
    (default `work`): the micro-batch whose busiest rank the EP exchange is planned from
    (low-latency or not, its buffer size): the engine plans both halves of a two-batch forward
    from the larger one (`parallel/expert.py: ExchangeChoice`)."""
    cfg, dep, hw, isz = sc.cfg, sc.deployment, sc.hw, sc.itemsize
    ranks = list(range(stage * dep.inner, (stage + 1) * dep.inner))
    tokens = [_tokens(w) for w in work]
    seqs = [sum(b for b, _, _ in w) for w in work]
    D = cfg.d_model

    prefix: list = []
    a = sc.attn_tp if dep.ep > 1 else 1
    if a > 1:
        groups = [ranks[g:g + a] for g in range(0, len(ranks), a)]
        group_work = _groups(sc, work)
        group_bytes = [_tokens(w) * D * isz for w in group_work]
        prefix.append(Phase("attention", tuple(_attention(sc, w) for w in group_work)))
        prefix.append(_group_phase(sc, groups, "attention reduce-scatter", group_bytes))
        tokens = _dispatched(sc, work)
    else:
        prefix.append(Phase("attention", tuple(_attention(sc, w) for w in work)))
    if dep.tp > 1:
        prefix.append(_collective(sc, ranks, "all-reduce", [t * D * isz for t in tokens]))
    suffix = [_group_phase(sc, groups, "attention all-gather", group_bytes)] if a > 1 else []
    dense = [*prefix, Phase("dense mlp", tuple(_dense_mlp(sc, t) for t in tokens))]
    if dep.tp > 1:
        dense.append(_collective(sc, ranks, "all-reduce", [t * D * isz for t in tokens]))
    dense += [Phase("residual", tuple(cost.elementwise(hw, 3 * t * D * isz, 1) for t in tokens)), *suffix]

    layer = list(prefix)
    layer.append(Phase("router", tuple(_moe_pre(sc, t) for t in tokens)))
    if dep.ep > 1:
        layer += _ep_exchange(sc, ranks, tokens, max(_dispatched(sc, plan_work or work)))
    else:
        shares = sc.routing.shares(cfg.n_experts, cfg.top_k)
        loads = [[t * cfg.top_k * s for s in shares] for t in tokens]
        layer.append(Phase("experts", tuple(_experts(sc, l, t) for l, t in zip(loads, tokens))))
        if dep.tp > 1:
            layer.append(_collective(sc, ranks, "all-reduce", [t * D * isz for t in tokens]))
    layer.append(Phase("combine", tuple(_combine(sc, t) for t in tokens)))
    layer += suffix

    embed, head = [], ()
    decode_only = all(L == 1 for w in work for _, L, _ in w)
    if dep.ep > 1 and sc.low_latency_tokens and not decode_only:
        embed.append(exchange_choice(sc, ranks))
    if stage == 0:
        embed.append(Phase("embed", tuple(cost.elementwise(hw, 2 * t * D * isz, 1) for t in tokens)))
    if stage == dep.pp - 1:
        # the head sees the last position of each sequence; every TP rank computes all of it
        head_dt = "bf16" if sc.fp8 else cfg.dtype
        head = (Phase("head", tuple(cost.total([
            cost.elementwise(hw, (2 * b * D + 2 * b * cfg.vocab_size) * isz, HEAD_OPS),
            cost.gemm(hw, head_dt, isz, b, cfg.vocab_size, D)]) for b in seqs)),)
    held = dep.stage_layers(cfg.n_layers)[stage]
    n_dense = sum(cfg.is_dense(i) for i in held)
    return StageProgram(tuple(embed), tuple(layer), head, len(held) - n_dense, tuple(dense), n_dense)
