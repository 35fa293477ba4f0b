"""Attention backends over the paged KV pool (`model/paged.py`): one interface, chosen per device.

A backend has `name`, `host_arrays(batch)` (index arrays only the host can make, uploaded with
the step's plan), `prepare(batch, uploaded)` (its per-step state, once per step, kept as
`batch.meta`) and `attend(q [N, h, d], pool, batch)` -> `[N, h, d]` (per layer, after the new
tokens' k, v are stored). `torch_paged.TorchBackend` is the reference (CPU, and CUDA without
FlashInfer); `flashinfer.FlashInferBackend` runs FlashInfer's paged kernels on CUDA.
"""

from __future__ import annotations

import importlib.util
import sys

from expertmesh.model.attn_backends.torch_paged import TorchBackend


def choose_backend(pool, layer):
    """FlashInfer on CUDA where it is installed (with a one-line warning where it is not), the
    torch backend otherwise, for the pools like `pool` (a `KVPool`) of layers like `layer` (a
    `DecoderLayer`; both None on a stage without layers)."""
    if pool is None:
        return TorchBackend()
    if pool.k.device.type == "cuda":
        if importlib.util.find_spec("flashinfer") is not None:
            from expertmesh.model.attn_backends.flashinfer import FlashInferBackend
            attn = layer.attn
            return FlashInferBackend(attn.n_heads, attn.n_kv_heads, attn.head_dim, pool.k.dtype, pool.k.device)
        print("warning: flashinfer is not installed (pip install 'expertmesh[gpu]'); paged attention "
              "runs the torch backend", file=sys.stderr)
    return TorchBackend.for_pool(pool.k)
