"""A fresh prefill through multi-head latent attention (`model/mla.py`) in its two forms, side by
side: expanded (what the engine runs when no sequence has cached positions) and absorbed (what it
runs for decode and later chunks, forced here on the same prompt).

    python benchmarks/mla_prefill.py [--device cuda] [--heads 16] [--lens 512,2048] [--reps 5]

DeepSeek-V3's per-head shapes (kv_lora_rank 512, qk_rope_head_dim 64, qk_nope_head_dim 128,
v_head_dim 128, q_lora_rank 1536), `--heads` of them (128 in the model), d_model 2048, one
sequence, bf16 on CUDA and fp32 on the CPU, random weights. Prints per prompt length the median ms
of each form over interleaved repetitions and their ratio; the outputs are checked to agree first.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from expertmesh.config import ModelConfig
from expertmesh.model.attention import Contiguous
from expertmesh.model.transformer import reference_model


class Absorbed(Contiguous):
    """A cacheless view that reports cached positions, so that the layer takes the absorbed form."""

    fresh = False


def latent_attention(heads: int, device: str, dtype: torch.dtype):
    cfg = ModelConfig(name="mla", n_layers=1, n_experts=2, top_k=1, d_model=2048, n_heads=heads,
                      n_kv_heads=heads, head_dim=192, expert_hidden=64, vocab_size=64, max_seq_len=8192,
                      expert_kind="swiglu", kv_lora_rank=512, q_lora_rank=1536, qk_rope_head_dim=64,
                      v_head_dim=128, rope_interleave=True)
    return reference_model(cfg, seed=0, dtype=dtype, device=device).layers["0"].attn


def time_forms(attn, L: int, reps: int, device: str) -> tuple[float, float]:
    """Median ms of the expanded and the absorbed form over one prompt of L tokens."""
    p = next(attn.parameters())
    x = torch.randn(1, L, 2048, generator=torch.Generator().manual_seed(L)).to(device, p.dtype)
    with torch.inference_mode():
        expanded, absorbed = attn(x, Contiguous(None)), attn(x, Absorbed(None))
        scale = expanded.abs().max().item()
        assert (expanded - absorbed).abs().max().item() <= 2e-2 * scale, "the forms disagree"
        times = {"expanded": [], "absorbed": []}
        for _ in range(reps):
            for form, view in (("expanded", Contiguous(None)), ("absorbed", Absorbed(None))):
                if device == "cuda":
                    torch.cuda.synchronize()
                start = time.perf_counter()
                attn(x, view)
                if device == "cuda":
                    torch.cuda.synchronize()
                times[form].append(time.perf_counter() - start)
    return statistics.median(times["expanded"]) * 1e3, statistics.median(times["absorbed"]) * 1e3


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cpu")
    p.add_argument("--heads", type=int, default=16)
    p.add_argument("--lens", default="512,2048")
    p.add_argument("--reps", type=int, default=5)
    args = p.parse_args()
    attn = latent_attention(args.heads, args.device, torch.bfloat16 if args.device == "cuda" else torch.float32)
    for L in (int(v) for v in args.lens.split(",")):
        exp_ms, abs_ms = time_forms(attn, L, args.reps, args.device)
        print(f"{args.heads} heads, prompt {L:>5}: expanded {exp_ms:8.2f} ms, absorbed {abs_ms:8.2f} ms, "
              f"absorbed / expanded {abs_ms / exp_ms:.2f}x")


if __name__ == "__main__":
    main()
