"""Throughput of the reference MoE block against a plain matmul chain of the same FLOPs.

The block (router -> sort by expert -> grouped expert compute -> combine) does, per token, k expert
MLPs of d_model x hidden plus the router. The baseline is the same expert arithmetic as two dense
matmuls, x `[T * k, D]` @ W_up.T -> gelu -> @ W_down.T, which is what the block would cost with no
routing overhead and perfectly even experts. Their ratio says how much the MoE machinery (routing,
gather, per-expert grouping, combine) costs; the target is >= 0.8. The block runs twice: with the
grouped kernel (`torch._grouped_mm`) and with the per-expert loop that is its fallback.

Repetitions are interleaved (block, loop, dense, block, loop, dense, ...) so that a change of machine
load hits every variant alike; figures are medians.

    python benchmarks/moe_block.py                 # bf16, 4096 tokens
    python benchmarks/moe_block.py --dtype fp32
    python benchmarks/moe_block.py --tokens 1024 --reps 3
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from rich.console import Console
from rich.table import Table

from expertmesh.config import parse_dtype
from expertmesh.model import moe
from expertmesh.model.moe import MoEBlock
from expertmesh.model.synthetic import materialize

TARGET_RATIO = 0.8


@contextmanager
def per_expert_loop():
    """Make `GroupedExperts` take its fallback path: one matmul per expert."""
    applies = moe._grouped_mm_applies
    moe._grouped_mm_applies = lambda x, hidden: False
    try:
        yield
    finally:
        moe._grouped_mm_applies = applies


def timed(fn: Callable[[], torch.Tensor], device: torch.device) -> float:
    t0 = time.perf_counter()
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - t0


def measure(tokens: int = 4096, d_model: int = 1024, experts: int = 8, top_k: int = 2,
            hidden: int = 2816, dtype: str = "bf16", reps: int = 3, device: str = "cpu") -> dict:
    """Time the three variants (interleaved, `reps` rounds) and return the figures as data:
    `variants[name] = {"ms", "gflops", "tokens_per_s", "vs_dense"}` (medians), `ratio` (grouped
    block / dense chain), tokens per expert and the grouped-vs-loop max |diff|."""
    torch_dtype, device = parse_dtype(dtype), torch.device(device)
    T, D, E, k, H = tokens, d_model, experts, top_k, hidden

    block = materialize(MoEBlock(D, E, k, H, "mlp", renormalize=True), 0, torch_dtype, device)
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(1, T, D, generator=gen).to(device, torch_dtype)
    x_dense = torch.randn(T * k, D, generator=gen).to(device, torch_dtype)
    w_up, w_down = block.experts.w_up[0].clone(), block.experts.w_down[0].clone()  # [H, D], [D, H]

    def dense() -> torch.Tensor:
        return F.linear(F.gelu(F.linear(x_dense, w_up)), w_down)

    def looped() -> torch.Tensor:
        with per_expert_loop():
            return block(x)

    variants = {"MoE block, grouped mm": lambda: block(x), "MoE block, per-expert loop": looped,
                "dense chain, same FLOPs": dense}
    expert_flops = 2 * 2 * T * k * D * H  # up and down, 2 FLOPs per multiply-add
    flops = {"MoE block, grouped mm": expert_flops + 2 * T * D * E,  # + router
             "MoE block, per-expert loop": expert_flops + 2 * T * D * E,
             "dense chain, same FLOPs": expert_flops}

    with torch.inference_mode():
        ids, _ = block.router(x.view(T, D))
        counts = torch.bincount(ids.view(-1), minlength=E)
        grouped, loop = block(x), looped()  # also the warm-up
        dense()
        diff = (grouped.float() - loop.float()).abs().max().item()
        times: dict[str, list[float]] = {name: [] for name in variants}
        for _ in range(reps):
            for name, fn in variants.items():
                times[name].append(timed(fn, device))

    base = statistics.median(times["dense chain, same FLOPs"])
    where = (torch.cuda.get_device_name(device) if device.type == "cuda"
             else f"CPU, {torch.get_num_threads()} threads")
    out = {}
    for name, ts in times.items():
        t = statistics.median(ts)
        out[name] = {"ms": t * 1e3, "gflops": flops[name] / t / 1e9, "tokens_per_s": T / t,
                     "vs_dense": base / t}
    return {"tokens": T, "d_model": D, "experts": E, "top_k": k, "hidden": H, "dtype": dtype,
            "reps": reps, "where": where, "variants": out,
            "ratio": out["MoE block, grouped mm"]["vs_dense"], "target": TARGET_RATIO,
            "tokens_per_expert": counts.tolist(),
            "imbalance": counts.max().item() / counts.float().mean().item(), "max_abs_diff": diff}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tokens", type=int, default=4096)
    p.add_argument("--d-model", type=int, default=1024)
    p.add_argument("--experts", type=int, default=8)
    p.add_argument("--top-k", type=int, default=2)
    p.add_argument("--hidden", type=int, default=2816)
    p.add_argument("--dtype", default="bf16", help="bf16 (default) or fp32")
    p.add_argument("--reps", type=int, default=3, help="timed repetitions of each variant")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    p.add_argument("--device", default="cpu", help="cpu (default) or cuda")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    r = measure(args.tokens, args.d_model, args.experts, args.top_k, args.hidden, args.dtype,
                args.reps, args.device)
    table = Table(title=f"MoE block: {r['tokens']} tokens, d_model {r['d_model']}, {r['experts']} "
                        f"experts, top-{r['top_k']}, hidden {r['hidden']} (mlp), {args.dtype}, "
                        f"{r['where']}, median of {args.reps}")
    for col in ("variant", "ms", "GFLOP/s", "tokens/s", "vs dense"):
        table.add_column(col, justify="left" if col == "variant" else "right")
    for name, v in r["variants"].items():
        table.add_row(name, f"{v['ms']:,.1f}", f"{v['gflops']:,.1f}", f"{v['tokens_per_s']:,.0f}",
                      f"{v['vs_dense']:.2f}")
    console = Console()
    console.print(table)
    verdict = "meets" if r["ratio"] >= TARGET_RATIO else "is below"
    console.print(f"grouped block / dense chain = {r['ratio']:.2f}: {verdict} the target {TARGET_RATIO}. "
                  f"Tokens per expert: {r['tokens_per_expert']} (max / mean {r['imbalance']:.2f}); "
                  f"grouped vs loop max |diff| {r['max_abs_diff']:.2e}", highlight=False)


if __name__ == "__main__":
    main()
