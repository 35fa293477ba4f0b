"""expertmesh's MoE layer against the ones users would pick instead, on the same machine, the same
weights and the same tokens, in one process (or one pair of local ranks):

- `deepspeed_moe`: expert parallelism, 2 gloo ranks, EP=2, against `deepspeed.moe.layer.MoE`
  (top-2, `drop_tokens=False`: its capacity is the largest expert load of the call, so it drops
  nothing), GELU MLP experts (the seed's) given to DeepSpeed as an `nn.Module` with our weights,
  and against a plain uneven all-to-all layer with the same weights (`plain_ep.py`).
- `transformers_blocks`: one device, against transformers' `MixtralSparseMoeBlock` and
  `Qwen2MoeSparseMoeBlock` under each experts implementation transformers has (`eager`, its
  per-expert loop; `grouped_mm`; `batched_mm` where its per-token weight copies fit in memory).

Each comparison first checks, in fp32, that both sides compute the same function on the same
tokens (bf16 rounding of the router logits can flip a near-tie between two experts, which makes a
bf16 comparison say little), then times with interleaved repetitions and reports medians: the
expert-parallel layer in fp32 against a load-aware ceiling too (see `deepspeed_moe`), the
single-device blocks in bf16.
A peer that is not installed or cannot run here is reported as skipped with its reason; expertmesh's
own layer runs first, alone, checked against its single-device block, so that a failure of ours is
reported as `failed`, never blamed on a peer.

A section is a dict: title, against (what its `ratio` column compares expertmesh with: "peers",
"ourselves" or "published"), status ("ok", "skipped", "failed"), reason, setup, columns
(`{"key", "header", "fmt"}`), rows (dicts of numbers), notes; `report.py` renders it.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import importlib
import io
import json
import logging
import os
import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from rich.console import Console
from torch import nn

try:  # imported as part of the `benchmarks` package, or beside it
    from . import report
    from .plain_ep import PlainEPLayer
except ImportError:
    import report
    from plain_ep import PlainEPLayer
from expertmesh.config import DTYPES, preset
from expertmesh.engine.shard import install_expert_kernels
from expertmesh.launch import launch
from expertmesh.model.expert_kernels import fixed
from expertmesh.model.moe import MoEBlock
from expertmesh.model.synthetic import materialize
from expertmesh.model.transformer import build_model
from expertmesh.parallel.expert import apply_expert_parallel
from expertmesh.parallel.placement import default_placement

FP32_RTOL = 1e-4  # max |ours - peer| / max |ours| in fp32 (observed ~1e-7)
PEERS_EXTRA = "pip install -e .[peers]"


@dataclass(frozen=True)
class Dims:
    """One MoE layer's shape: d_model, experts, top-k, expert hidden, shared expert hidden."""

    d_model: int
    experts: int
    top_k: int
    hidden: int
    shared: int = 0

    def flops_per_token(self, kind: str) -> int:
        matrices = 3 if kind == "swiglu" else 2
        routed = 2 * matrices * self.top_k * self.d_model * self.hidden
        return routed + 2 * 3 * self.d_model * self.shared + 2 * self.d_model * self.experts


AGAINST = ("peers", "ourselves", "published")


def section(title: str, against: str, **fields) -> dict:
    if against not in AGAINST:
        raise ValueError(f"against {against!r}: one of {AGAINST}")
    return {"title": title, "against": against, "status": "ok", "reason": None, "setup": {}, "columns": [],
            "rows": [], "notes": [], **fields}


def skipped(title: str, against: str, reason: str) -> dict:
    return section(title, against, status="skipped", reason=reason)


def col(key: str, header: str, fmt: str = "{:,.0f}") -> dict:
    return {"key": key, "header": header, "fmt": fmt}


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}"


def relative_diff(ours: torch.Tensor, peer: torch.Tensor) -> float:
    ours, peer = ours.float(), peer.float()
    return (ours - peer).abs().max().item() / max(ours.abs().max().item(), 1e-30)


# -- DeepSpeed-MoE, expert-parallel ------------------------------------------------------------


class GeluMLP(nn.Module):
    """expertmesh's `mlp` expert as an `nn.Module` for DeepSpeed: x -> down(gelu(up(x)))."""

    def __init__(self, d_model: int, hidden: int):
        super().__init__()
        self.up = nn.Linear(d_model, hidden, bias=False)
        self.down = nn.Linear(hidden, d_model, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down(F.gelu(self.up(x)))


def import_deepspeed():
    """deepspeed, quietly; raises whatever stops it from importing here."""
    os.environ.setdefault("DS_ACCELERATOR", "cpu")  # the comparison runs on CPU ranks over gloo
    with contextlib.redirect_stdout(io.StringIO()):
        deepspeed = importlib.import_module("deepspeed")
        importlib.import_module("deepspeed.moe.layer")
    logging.getLogger("DeepSpeed").setLevel(logging.ERROR)
    return deepspeed


def _our_layer(dims: Dims, seed: int, parallel: bool = True) -> MoEBlock:
    """expertmesh's MoE layer (fp32): this rank's expert-parallel one over the launched group,
    or (parallel=False) the single-device block with the same weights."""
    cfg = preset("small", n_layers=1, d_model=dims.d_model, n_experts=dims.experts,
                 top_k=dims.top_k, expert_hidden=dims.hidden, expert_kind="mlp", renormalize=True)
    model = build_model(cfg)
    if parallel:
        ranks = dist.get_world_size()
        apply_expert_parallel(model, dist.group.WORLD, dist.get_rank(), default_placement(1, dims.experts, ranks))
    return materialize(model, seed, torch.float32).layers["0"].moe


def _rank_tokens(dims: Dims, tokens: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(every rank's tokens `[1, ranks * tokens, D]`, this rank's `[1, tokens, D]`)."""
    rank, ranks = dist.get_rank(), dist.get_world_size()
    gen = torch.Generator().manual_seed(seed + 1)
    everyone = torch.randn(1, ranks * tokens, dims.d_model, generator=gen)
    return everyone, everyone[:, rank * tokens:(rank + 1) * tokens]


def _check_ours(device: torch.device, dims: Dims, token_counts: tuple[int, ...], seed: int,
                dtype: torch.dtype) -> float:
    """Before any peer runs: expertmesh's EP layer against the single-device block on every rank's
    tokens (fp32), at every size, then one call in `dtype`; the largest relative difference."""
    ours, single = _our_layer(dims, seed), _our_layer(dims, seed, parallel=False)
    rank, worst = dist.get_rank(), 0.0
    with torch.inference_mode():
        for tokens in token_counts:
            everyone, x = _rank_tokens(dims, tokens, seed)
            want = single(everyone)[:, rank * tokens:(rank + 1) * tokens]
            worst = max(worst, relative_diff(ours(x), want))
        ours.to(dtype)(x.to(dtype))
    diff = torch.tensor([worst])
    dist.all_reduce(diff, op=dist.ReduceOp.MAX)
    return diff.item()


def _ep_layers(dims: Dims, seed: int, with_deepspeed: bool) -> tuple[nn.Module, nn.Module | None]:
    """(ours, DeepSpeed's or None) expert-parallel MoE layer for this rank, fp32, the same weights."""
    if not with_deepspeed:
        return _our_layer(dims, seed), None
    deepspeed = import_deepspeed()
    from deepspeed.moe.layer import MoE

    with contextlib.redirect_stdout(io.StringIO()):
        deepspeed.init_distributed(dist_backend="gloo")  # joins the group launch() made
    ranks = dist.get_world_size()
    ours = _our_layer(dims, seed)

    with contextlib.redirect_stdout(io.StringIO()):
        peer = MoE(dims.d_model, GeluMLP(dims.d_model, dims.hidden), num_experts=dims.experts,
                   ep_size=ranks, k=dims.top_k, drop_tokens=False, use_rts=False,
                   top2_2nd_expert_sampling=False)
        peer.set_deepspeed_parallelism()
    # DeepSpeed's rank r holds experts r*El .. r*El+El-1 (it splits the [E, C, D] buffer evenly),
    # which is expertmesh's contiguous placement: local expert i is the same expert on both.
    with torch.no_grad():
        peer.deepspeed_moe.gate.wg.weight.copy_(ours.router.weight)
        for i, expert in enumerate(peer.deepspeed_moe.experts.deepspeed_experts):
            expert.up.weight.copy_(ours.experts.w_up[i])
            expert.down.weight.copy_(ours.experts.w_down[i])
    return ours, peer.eval()


def _timed_pair(fns: dict[str, Callable[[], object]], reps: int, sync: Callable[[], None]) -> dict:
    """Interleaved repetitions of every fn after one warm-up each; seconds per call, all reps."""
    for fn in fns.values():
        fn()
    times = {name: [] for name in fns}
    for _ in range(reps):
        for name, fn in fns.items():
            sync()
            t0 = time.perf_counter()
            fn()
            sync()
            times[name].append(time.perf_counter() - t0)
    return times


def _ceiling(ours: nn.Module, x: torch.Tensor) -> Callable[[], object]:
    """The load-aware ceiling of this rank: the expert rows it computed in the last call of `ours`
    (`loads` of its dispatcher), as plain matmuls with no routing or exchange."""
    experts = ours.experts
    rows = ours.dispatcher.stats.loads[-1]
    inputs = [x.reshape(-1, x.shape[-1]).new_ones(n, x.shape[-1]) for n in rows]
    return lambda: [F.linear(F.gelu(F.linear(xe, experts.w_up[e])), experts.w_down[e])
                    for e, xe in enumerate(inputs)]


def _with_plan(layer: MoEBlock, plan, x: torch.Tensor) -> torch.Tensor:
    """`layer(x)` with its experts' kernel plan `plan` for this call."""
    before, layer.experts.kernels = layer.experts.kernels, plan
    try:
        return layer(x)
    finally:
        layer.experts.kernels = before


def _ep_rank(device: torch.device, dims: Dims, tokens: int, reps: int, seed: int, dtype: torch.dtype,
             with_deepspeed: bool = True) -> dict:
    """On each rank: check agreement in fp32, then time the layers and the load-aware ceiling in
    `dtype` on `tokens` tokens: expertmesh with its default `--expert-kernel auto` and with the
    grouped kernel alone (the default before `auto`), DeepSpeed-MoE (`with_deepspeed`) and the
    plain layer. Times are the slowest rank's medians (a layer waits for it); diff: the largest
    disagreement of a peer with expertmesh."""
    ours, peer = _ep_layers(dims, seed, with_deepspeed)
    plain = PlainEPLayer(ours.router.weight, ours.experts.w_up, ours.experts.w_down, dims.top_k)
    _, x = _rank_tokens(dims, tokens, seed)
    with torch.inference_mode():
        reference = ours(x)
        diffs = [relative_diff(reference, plain(x))] + ([relative_diff(reference, peer(x)[0])] if peer else [])
        diff = torch.tensor([max(diffs)])
        dist.all_reduce(diff, op=dist.ReduceOp.MAX)
        if diff.item() > FP32_RTOL:
            return {"diff": diff.item()}
        ours.to(dtype)
        plain.to(dtype)
        install_expert_kernels(ours, "auto", device)  # for `dtype` (collective: rank 0 decides)
        xb = x.to(dtype)
        layers = {"expertmesh": lambda: ours(xb),
                  "expertmesh_grouped": functools.partial(_with_plan, ours, fixed("grouped"), xb),
                  "plain": lambda: plain(xb)}
        capacity = torch.zeros(1, dtype=torch.long)
        if peer:
            peer.to(dtype)
            peer(xb)  # sets exp_counts: this rank's assignments per expert
            capacity = peer.deepspeed_moe.exp_counts.max().view(1)
            dist.all_reduce(capacity, op=dist.ReduceOp.MAX)  # DeepSpeed's capacity for the call
            layers["deepspeed"] = lambda: peer(xb)
        ours(xb)  # records the rows each local expert computes
        layers["ceiling"] = _ceiling(ours, xb)
        times = _timed_pair(layers, reps, dist.barrier)
        medians = torch.tensor([statistics.median(times[k]) for k in layers])
        dist.all_reduce(medians, op=dist.ReduceOp.MAX)
    return {"diff": diff.item(), "capacity": int(capacity), "plan": ours.experts.kernels.to_json(),
            **dict(zip(layers, medians.tolist()))}


def deepspeed_moe(token_counts: tuple[int, ...], reps: int, dims: Dims, seed: int = 0,
                  progress: Callable[[], None] | None = None, timeout: float = 900,
                  dtype: str = "fp32", skip_without_deepspeed: bool = True) -> dict:
    """expertmesh EP=2 against DeepSpeed-MoE EP=2 (2 local gloo ranks, one thread each).
    Where DeepSpeed cannot be imported the section is skipped, or (`skip_without_deepspeed`
    False) runs without it: expertmesh against the plain layer and the ceiling only.

    fp32 by default: on this CPU a bf16 GEMM runs about 6x slower than an fp32 one, and DeepSpeed's
    dispatch and combine are dense einsums over [experts x capacity, tokens], so in bf16 the
    comparison measured the CPU's bf16 GEMM more than the layer (measured at 512 tokens / rank:
    DeepSpeed / expertmesh time 2.15 in bf16, 0.94 in fp32)."""
    title = "Expert-parallel MoE layer, EP=2: expertmesh vs DeepSpeed-MoE and a plain layer"
    try:
        deepspeed, missing = import_deepspeed(), None
    except Exception as exc:  # not installed, or its import fails on this machine
        deepspeed, missing = None, f"deepspeed cannot be imported ({_first_line(exc)}); {PEERS_EXTRA}"
        if skip_without_deepspeed:
            return skipped(title, "peers", missing)
    out = section(title, "peers", setup={**asdict(dims), "kind": "mlp (GELU)", "dtype": dtype,
                                "ranks": 2, "threads_per_rank": 1, "reps": reps,
                                "deepspeed": deepspeed.__version__ if deepspeed else None})
    out["columns"] = [col("tokens_per_rank", "tokens / rank"), col("expertmesh_tps", "expertmesh tok/s"),
                      col("deepspeed_tps", "DeepSpeed tok/s"), col("ratio", "expertmesh / DS", "x{:.2f}"),
                      col("expertmesh_of_ceiling", "expertmesh / ceiling", "{:.2f}"),
                      col("grouped_of_ceiling", "grouped only / ceiling", "{:.2f}"),
                      col("deepspeed_of_ceiling", "DS / ceiling", "{:.2f}"),
                      col("plain_of_ceiling", "plain / ceiling", "{:.2f}"),
                      col("plain_ratio", "expertmesh / plain", "x{:.2f}"),
                      col("plan", "auto's kernels", "{}"),
                      col("deepspeed_rows_per_assignment", "DS rows computed / assignment", "{:.2f}"),
                      col("fp32_rel_diff", "fp32 rel. diff", "{:.1e}")]
    out["plot"] = {"kind": "line", "x": "tokens_per_rank",
                   "y": ["expertmesh_tps", "deepspeed_tps", "plain_tps", "ceiling_tps"],
                   "labels": ["expertmesh", "DeepSpeed-MoE", "plain all-to-all layer", "load-aware ceiling"],
                   "ylabel": "tokens/s (both ranks)", "logx": True}
    out["summary"] = f"tokens/rank {min(token_counts)}..{max(token_counts)}, {dtype}, 2 gloo ranks"
    out["notes"] = [
        "DeepSpeed: MoE(k=2, drop_tokens=False, use_rts=False, top2_2nd_expert_sampling=False): "
        "its capacity per expert is the largest expert load of the call (all-reduced over the EP "
        "group), so no token is dropped; its 2nd expert is the plain argmax (no Gumbel sampling), "
        "its top-2 weights renormalized, as expertmesh's router.",
        "load-aware ceiling: on each rank, the rows its experts really computed in the call, as plain "
        "matmuls (no routing, no exchange); the slowest rank's time. Routing imbalance is not overhead.",
        "plain layer (`plain_ep.py`): fp32 routing, assignments sorted by expert, four blocking "
        "all_to_all_single calls (counts, rows, expert ids, results), one GELU MLP per expert.",
        "times: medians of interleaved calls, each from a barrier to a barrier, the slowest rank's.",
        "agreement: max |expertmesh - peer| / max |expertmesh| in fp32 over both peers, same tokens, "
        "before timing.",
        "expertmesh runs with its default `--expert-kernel auto` (the kernels it chose per rows-per-expert "
        "bucket in 'auto's kernels'); 'grouped only' is the same layer with torch._grouped_mm at every "
        "size, the default before auto.",
    ] + ([f"DeepSpeed-MoE skipped: {missing}"] if missing else [])
    # ours first, alone: a failure of expertmesh's own layer is ours, never a skipped peer's
    try:
        ours_diff = launch(functools.partial(_check_ours, dims=dims, token_counts=token_counts, seed=seed,
                                             dtype=DTYPES[dtype]), 2, timeout=timeout)
    except Exception as exc:
        return {**out, "status": "failed", "reason": f"expertmesh's EP layer failed to run: {_first_line(exc)}"}
    if ours_diff > FP32_RTOL:
        return {**out, "status": "failed",
                "reason": f"expertmesh's EP layer differs from its single-device block: rel. diff {ours_diff:.1e}"}
    for tokens in token_counts:
        try:
            r = launch(functools.partial(_ep_rank, dims=dims, tokens=tokens, reps=reps, seed=seed,
                                         dtype=DTYPES[dtype], with_deepspeed=deepspeed is not None),
                       2, timeout=timeout)
        except Exception as exc:  # ours ran above at this size: a peer that cannot run here is a skip
            if deepspeed is None:
                return {**out, "status": "failed", "reason": f"expertmesh's EP layer failed to run: {_first_line(exc)}"}
            return {**out, "status": "skipped", "reason": f"DeepSpeed-MoE failed to run: {_first_line(exc)}"}
        if progress:
            progress()
        if "expertmesh" not in r:
            return {**out, "status": "failed",
                    "reason": f"outputs differ in fp32 at {tokens} tokens/rank: rel. diff {r['diff']:.1e}"}
        ours, plain, ceiling, peer = r["expertmesh"], r["plain"], r["ceiling"], r.get("deepspeed")
        row = {"tokens_per_rank": tokens, "expertmesh_tps": 2 * tokens / ours, "plain_tps": 2 * tokens / plain,
               "ceiling_tps": 2 * tokens / ceiling, "plain_ratio": plain / ours, "plain_s": plain,
               "expertmesh_of_ceiling": ceiling / ours, "grouped_of_ceiling": ceiling / r["expertmesh_grouped"],
               "plain_of_ceiling": ceiling / plain, "plan": " ".join(f"{k}:{v}" for k, v in r["plan"].items()),
               "fp32_rel_diff": r["diff"], "expertmesh_s": ours, "grouped_s": r["expertmesh_grouped"],
               "ceiling_s": ceiling}
        if peer is not None:
            row.update({"deepspeed_tps": 2 * tokens / peer, "ratio": peer / ours, "deepspeed_of_ceiling": ceiling / peer,
                        "deepspeed_s": peer, "deepspeed_capacity": r["capacity"],
                        "deepspeed_rows_per_assignment": dims.experts * r["capacity"] / (tokens * dims.top_k)})
        out["rows"].append(row)
    return out


# -- transformers' sparse MoE blocks, one device -----------------------------------------------

FAMILIES = ("mixtral", "qwen2_moe")
BATCHED_MM_LIMIT = 1 << 30  # bytes: batched_mm copies every assignment's expert weights


def experts_implementations() -> list[str]:
    """transformers' experts implementations, `eager` (its per-expert loop) first."""
    from transformers.integrations import moe as hf_moe

    registered = getattr(hf_moe, "ALL_EXPERTS_FUNCTIONS", {})
    return ["eager", *[name for name in ("grouped_mm", "batched_mm") if name in registered]]


def _hf_block(family: str, ours: MoEBlock, dims: Dims, implementation: str) -> nn.Module:
    """transformers' block of `family` holding `ours`' weights (fp32, eval)."""
    if family == "mixtral":
        from transformers.models.mixtral.configuration_mixtral import MixtralConfig
        from transformers.models.mixtral.modeling_mixtral import MixtralSparseMoeBlock

        config = MixtralConfig(hidden_size=dims.d_model, intermediate_size=dims.hidden,
                               num_local_experts=dims.experts, num_experts_per_tok=dims.top_k,
                               hidden_act="silu")
        block_class = MixtralSparseMoeBlock
    else:
        from transformers.models.qwen2_moe.configuration_qwen2_moe import Qwen2MoeConfig
        from transformers.models.qwen2_moe.modeling_qwen2_moe import Qwen2MoeSparseMoeBlock

        config = Qwen2MoeConfig(hidden_size=dims.d_model, moe_intermediate_size=dims.hidden,
                                shared_expert_intermediate_size=dims.shared,
                                num_experts=dims.experts, num_experts_per_tok=dims.top_k,
                                norm_topk_prob=False, hidden_act="silu")
        block_class = Qwen2MoeSparseMoeBlock
    config._experts_implementation = implementation
    block = block_class(config).float().eval()
    with torch.no_grad():
        block.gate.weight.copy_(ours.router.weight)
        block.experts.gate_up_proj.copy_(torch.cat([ours.experts.w_gate, ours.experts.w_up], dim=1))
        block.experts.down_proj.copy_(ours.experts.w_down)
        if family == "qwen2_moe":
            for name in ("gate_proj", "up_proj", "down_proj"):
                ours_name = {"gate_proj": "w_gate", "up_proj": "w_up", "down_proj": "w_down"}[name]
                getattr(block.shared_expert, name).weight.copy_(getattr(ours.shared, ours_name).weight)
            block.shared_expert_gate.weight.copy_(ours.shared.gate.weight)
    return block


def family_dims(family: str, base: Dims) -> Dims:
    """Mixtral: top-2 of E experts, no shared expert. Qwen2-MoE: the same FLOPs per token as
    twice as many experts of a quarter the hidden size, top-4, plus a shared expert of the full
    hidden size (as Qwen1.5-MoE: 60 experts of 1408, top-4, shared 5632)."""
    if family == "mixtral":
        return Dims(base.d_model, base.experts, 2, base.hidden)
    return Dims(base.d_model, 2 * base.experts, 4, base.hidden // 4, shared=base.hidden)


def transformers_blocks(token_counts: tuple[int, ...], reps: int, base: Dims, threads: int = 2,
                        seed: int = 0, progress: Callable[[], None] | None = None) -> dict:
    """expertmesh's MoEBlock (swiglu) against transformers' Mixtral and Qwen2-MoE blocks."""
    title = "Single-device MoE block: expertmesh vs transformers"
    try:
        transformers = importlib.import_module("transformers")
        implementations = experts_implementations()
    except Exception as exc:
        return skipped(title, "peers", f"transformers cannot be imported ({_first_line(exc)}); {PEERS_EXTRA}")
    out = section(title, "peers", setup={"base": asdict(base), "dtype": "bf16", "threads": threads,
                                "reps": reps, "transformers": transformers.__version__,
                                "experts_implementations": implementations})
    out["columns"] = [col("family", "block", "{}"), col("tokens", "tokens"),
                      col("expertmesh_tps", "expertmesh tok/s"),
                      *[col(f"hf_{impl}_tps", f"HF {impl} tok/s") for impl in implementations],
                      col("best", "HF best", "{}"), col("ratio", "expertmesh / HF best", "x{:.2f}"),
                      col("fp32_rel_diff", "fp32 rel. diff", "{:.1e}")]
    out["plot"] = {"kind": "line", "x": "tokens", "group": "family",
                   "y": ["expertmesh_tps", *[f"hf_{impl}_tps" for impl in implementations]],
                   "labels": ["expertmesh", *[f"transformers {impl}" for impl in implementations]],
                   "ylabel": "tokens/s", "logx": True}
    out["summary"] = f"tokens {min(token_counts)}..{max(token_counts)}, bf16, {threads} threads; vs HF's fastest"
    out["notes"] = [
        "Same weights copied into both (gate_up_proj = [w_gate; w_up]); Mixtral renormalizes the "
        "top-2 weights, Qwen2-MoE does not (norm_topk_prob=False) and adds its sigmoid-gated "
        "shared expert, which expertmesh's MoEBlock holds as `shared`.",
        f"batched_mm is timed only where its copies of the expert weights stay under "
        f"{BATCHED_MM_LIMIT >> 30} GiB.",
        "agreement: max |expertmesh - HF| / max |expertmesh| in fp32, per implementation, before timing.",
    ]
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        for family in FAMILIES:
            dims = family_dims(family, base)
            out["setup"][family] = asdict(dims)
            ours = materialize(MoEBlock(dims.d_model, dims.experts, dims.top_k, dims.hidden, "swiglu",
                                        renormalize=family == "mixtral", shared_hidden=dims.shared),
                               seed, torch.float32)
            peers = {impl: _hf_block(family, ours, dims, impl) for impl in implementations}
            gen = torch.Generator().manual_seed(seed + 1)
            x = torch.randn(1, max(token_counts), dims.d_model, generator=gen)
            check = x[:, :64]
            with torch.inference_mode():
                reference = ours(check)
                diffs = {impl: relative_diff(reference, block(check)) for impl, block in peers.items()}
            bad = {impl: d for impl, d in diffs.items() if d > FP32_RTOL}
            if bad:
                return {**out, "status": "failed",
                        "reason": f"{family}: outputs differ in fp32: {bad}"}
            ours.to(torch.bfloat16)
            for block in peers.values():
                block.to(torch.bfloat16)
            for tokens in token_counts:
                xb = x[:, :tokens].to(torch.bfloat16)
                fns = {"expertmesh": functools.partial(ours, xb)}
                for impl, block in peers.items():
                    copies = tokens * dims.top_k * 3 * dims.d_model * dims.hidden * 2
                    if impl != "batched_mm" or copies <= BATCHED_MM_LIMIT:
                        fns[impl] = functools.partial(block, xb)
                with torch.inference_mode():
                    times = _timed_pair(fns, reps, lambda: None)
                med = {name: statistics.median(ts) for name, ts in times.items()}
                best = min((impl for impl in med if impl != "expertmesh"), key=med.get)
                row = {"family": family, "tokens": tokens, "expertmesh_tps": tokens / med["expertmesh"],
                       "best": best, "ratio": med[best] / med["expertmesh"],
                       "fp32_rel_diff": max(diffs.values())}
                for impl in implementations:
                    row[f"hf_{impl}_tps"] = tokens / med[impl] if impl in med else None
                out["rows"].append(row)
                if progress:
                    progress()
    finally:
        torch.set_num_threads(before)
    return out


# -- the EP=2 section alone --------------------------------------------------------------------


def main(argv: list[str] | None = None) -> list[dict]:
    """`python benchmarks/peers.py`: the EP=2 layer section at the sizes and dtypes asked for,
    with DeepSpeed-MoE where it imports (else expertmesh against the plain layer and the ceiling),
    each section's load average before and after it in its notes."""
    parser = argparse.ArgumentParser(prog="python benchmarks/peers.py", description=main.__doc__.splitlines()[0])
    parser.add_argument("--tokens", default="64,512,4096", help="tokens per rank, comma-separated (default %(default)s)")
    parser.add_argument("--dtype", default="fp32,bf16", help="comma-separated: fp32, bf16 (default %(default)s)")
    parser.add_argument("--reps", type=int, default=3, help="timed calls per layer and size (default %(default)s)")
    parser.add_argument("--json", default=None, help="write the sections to this file")
    args = parser.parse_args(argv)
    dims = Dims(d_model=1024, experts=8, top_k=2, hidden=2816)  # the `small` preset's MoE layer
    tokens = tuple(int(t) for t in args.tokens.split(","))
    console, sections = Console(width=200), []
    for dtype in args.dtype.split(","):
        before = os.getloadavg()
        sec = deepspeed_moe(tokens, args.reps, dims, dtype=dtype, skip_without_deepspeed=False)
        sec["notes"].append(f"load average (1, 5, 15 min) before {before}, after {os.getloadavg()}")
        report.render(sec, console)
        sections.append(sec)
    if args.json:
        Path(args.json).write_text(json.dumps(sections, indent=1, default=str))
    return sections


if __name__ == "__main__":
    main()
