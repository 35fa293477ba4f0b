"""The paged attention backends and decode graphs on a GPU (or, with --dry-run, tiny on the CPU):

    python benchmarks/attention_check.py --json attn-check.json      # CUDA, about a minute
    python benchmarks/attention_check.py --dry-run                   # CPU: checks the logic

1. `paged_vs_contiguous`: one decode step of one attention layer (projections, RoPE, KV write,
   attention) over a 10k-token context, batch 8, with the same keys and values in a contiguous
   cache and in a paged pool (blocks scattered): the backend the engine chooses (FlashInfer where
   installed, else torch), and the torch backend itself, against contiguous SDPA: median ms
   (device synchronized), the ratio, and max |Δ| of the outputs.
2. `decode_graph_tokens`: `single` engine runs of the same greedy requests (request i generates
   gen_len - i tokens, so decode steps run 8, 7, ... 1 sequences, padded to buckets 8, 4, 2, 1)
   with decode graphs (CUDA only), with the same padded buffers run eagerly ("padded") and with
   `--enforce-eager` ("off"): graphs must give exactly the padded run's tokens; against "off"
   they may differ only where bf16 rounding of a padded batch flips a near tie (rows listed);
   median ms per decode step of each. On CUDA the model is bf16 (the grouped expert kernel, which
   a graph can capture; the per-expert loop reads counts on the host: capture fails with a warning
   and decodes run eagerly).
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from expertmesh.config import preset  # noqa: E402
from expertmesh.deployment import Deployment  # noqa: E402
from expertmesh.engine.engine import Engine  # noqa: E402
from expertmesh.engine.request import Request  # noqa: E402
from expertmesh.engine.scheduler import EngineConfig  # noqa: E402
from expertmesh.model.attention import Attention, Contiguous, KVCache  # noqa: E402
from expertmesh.model.attn_backends import choose_backend  # noqa: E402
from expertmesh.model.attn_backends.torch_paged import TorchBackend  # noqa: E402
from expertmesh.model.paged import KVPool, PagedBatch, PagedView  # noqa: E402
from expertmesh.model.synthetic import materialize  # noqa: E402
from expertmesh.model.transformer import reference_model  # noqa: E402


def _median_ms(fn, device: torch.device, reps: int) -> float:
    times = []
    for _ in range(reps + 2):
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return statistics.median(times[2:]) * 1e3


class _Layer:  # what `choose_backend` reads of a decoder layer
    def __init__(self, attn):
        self.attn = attn


def paged_vs_contiguous(device: torch.device, batch: int = 8, context: int = 10_000,
                        n_heads: int = 32, n_kv_heads: int = 8, head_dim: int = 128,
                        dtype: torch.dtype = torch.bfloat16, block: int = 16, reps: int = 20) -> dict:
    """One decode step of an attention layer at `context`: contiguous cache vs paged pool."""
    d_model = n_heads * head_dim
    attn = materialize(Attention(d_model, n_heads, n_kv_heads, head_dim, 10000.0), seed=0, dtype=dtype,
                       device=device)
    gen = torch.Generator(device="cpu").manual_seed(0)
    x = torch.randn(batch, 1, d_model, generator=gen).to(device, dtype)
    keys, values = (torch.randn(batch, context, n_kv_heads, head_dim, generator=gen).to(device, dtype)
                    for _ in range(2))
    cache = KVCache(batch, context + 1, n_kv_heads, head_dim, dtype, device)
    cache.k[:, :context], cache.v[:, :context] = keys, values
    per_seq = -(-(context + 1) // block)
    pool = KVPool(batch * per_seq, block, n_kv_heads, head_dim, dtype, device)
    order = list(range(batch * per_seq))
    random.Random(0).shuffle(order)
    tables = [order[i * per_seq:(i + 1) * per_seq] for i in range(batch)]
    for i, table in enumerate(tables):
        ids = torch.tensor(table, device=device)
        for t, name in ((keys, "k"), (values, "v")):
            padded = torch.zeros(per_seq * block, n_kv_heads, head_dim, dtype=dtype, device=device)
            padded[:context] = t[i]
            getattr(pool, name)[ids] = padded.view(per_seq, block, n_kv_heads, head_dim)
    backends = {"torch": TorchBackend.for_device(device, n_kv_heads * head_dim * dtype.itemsize)}
    chosen = choose_backend(_Layer(attn), device, dtype)
    if chosen.name != "torch":
        backends[chosen.name] = chosen
    out = {"batch": batch, "context": context, "heads": [n_heads, n_kv_heads, head_dim],
           "dtype": str(dtype), "device": str(device)}
    with torch.inference_mode():
        want = attn(x, Contiguous(cache, slice(None), context))
        out["contiguous_ms"] = _median_ms(lambda: attn(x, Contiguous(cache, slice(None), context)), device, reps)
        for name, backend in backends.items():
            plan = PagedBatch([(context, 1, t) for t in tables], block, device, backend)
            got = attn(x.view(1, batch, d_model), PagedView(pool, plan))[0]
            out[f"{name}_max_abs_diff"] = (got.float() - want[:, 0].float()).abs().max().item()
            # the plan is built once per step, outside the layers: time the layer only
            out[f"{name}_ms"] = _median_ms(lambda: attn(x.view(1, batch, d_model), PagedView(pool, plan)),
                                           device, reps)
            out[f"{name}_ratio"] = out[f"{name}_ms"] / out["contiguous_ms"]
    return out


def decode_graph_tokens(device: torch.device, preset_name: str = "small", batch: int = 8,
                        prompt_len: int = 64, gen_len: int = 16, n_layers: int | None = None) -> dict:
    """`single` engine runs with decode graphs and eager: greedy tokens equal, ms per decode step."""
    overrides = {"n_layers": n_layers} if n_layers else {}
    cfg = preset(preset_name, **overrides)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    model = reference_model(cfg, seed=0, dtype=dtype, device=device)
    engine_cfg = EngineConfig(block_size=16, num_blocks=batch * -(-(prompt_len + gen_len) // 16) + 1,
                              max_batched_tokens=batch * prompt_len, max_seqs=batch)
    rng = random.Random(0)
    prompts = [tuple(rng.randrange(cfg.vocab_size) for _ in range(prompt_len)) for _ in range(batch)]
    out = {"preset": cfg.name, "layers": cfg.n_layers, "batch": batch, "prompt_len": prompt_len,
           "gen_len": gen_len, "dtype": str(dtype), "device": str(device)}
    tokens = {}
    modes = ("graphs", "padded", "off") if device.type == "cuda" else ("padded", "off")
    for mode in modes:
        t0 = time.perf_counter()
        engine = Engine(model, cfg, Deployment(), engine_cfg, graphs=mode)
        out[f"{mode}_start_s"] = time.perf_counter() - t0
        if mode == "graphs":
            out["graphs_captured"] = sorted(engine.runner.graphs.graphs) if engine.runner.graphs else []
        for i, p in enumerate(prompts):
            engine.add_request(Request(i, p, gen_len - i))
        got, step_ms = {i: [] for i in range(batch)}, []
        first = True
        while engine.has_work:
            if device.type == "cuda":
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            outs = engine.step()  # reads the sampled tokens: the device is done
            if not first:
                step_ms.append((time.perf_counter() - t0) * 1e3)
            first = False
            for o in outs:
                got[o.request_id].append(o.token)
        engine.shutdown()
        tokens[mode] = got
        out[f"{mode}_decode_step_ms"] = statistics.median(step_ms)
    if "graphs" in tokens:
        out["graphs_equal_padded"] = tokens["graphs"] == tokens["padded"]
    out["tokens_equal"] = tokens[modes[0]] == tokens["off"]
    out["rows_differing"] = [i for i in range(batch) if tokens[modes[0]][i] != tokens["off"][i]]
    return out


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--dry-run", action="store_true", help="tiny sizes on the CPU")
    p.add_argument("--json", default=None, help="write the figures here")
    args = p.parse_args(argv)
    if args.dry_run:
        device = torch.device("cpu")
        results = {"paged_vs_contiguous": paged_vs_contiguous(device, batch=2, context=100, n_heads=4,
                                                              n_kv_heads=2, head_dim=16, dtype=torch.float32,
                                                              reps=3),
                   "decode_graph_tokens": decode_graph_tokens(device, "tiny", batch=3, prompt_len=8, gen_len=4,
                                                              n_layers=2)}
    else:
        device = torch.device("cuda")
        results = {"paged_vs_contiguous": paged_vs_contiguous(device),
                   "decode_graph_tokens": decode_graph_tokens(device)}
    print(json.dumps(results, indent=1))
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))
    return results


if __name__ == "__main__":
    main()
