"""Attention backends over the paged KV pool (`model/paged.py`): one interface, chosen per device.

A backend has `name`, `host_arrays(batch)` (index arrays only the host can make, uploaded with
the step's plan; made from the step's seq_lens alone, so that a decode step continuing the last
keeps the last one's, `model/paged.py`), `prepare(batch, uploaded)` (its per-step state, once per step, kept as
`batch.meta`) and `attend(q [N, h, d], pool, batch)` -> `[N, h, d]` (per layer, after the new
tokens' k, v are stored). `torch_paged.TorchBackend` is the reference (CPU, and CUDA without
FlashInfer); `flashinfer.FlashInferBackend` runs FlashInfer's paged kernels on CUDA.
"""

from __future__ import annotations

import importlib.util
import sys

import torch

from expertmesh.model.attn_backends.torch_paged import TorchBackend


def flashinfer_applies(device: torch.device) -> bool:
    """FlashInfer runs here: a CUDA device, and the package installed."""
    return device.type == "cuda" and importlib.util.find_spec("flashinfer") is not None


def choose_backend(layer, device: torch.device, dtype: torch.dtype):
    """FlashInfer on CUDA where it is installed (with a one-line warning where it is not), the
    torch backend otherwise, for layers like `layer` (a `DecoderLayer`; None on a stage without
    layers) whose KV pools are on `device` in `dtype`."""
    if layer is None:
        return TorchBackend()
    attn = layer.attn
    if flashinfer_applies(device):
        from expertmesh.model.attn_backends.flashinfer import FlashInferBackend
        return FlashInferBackend(attn.n_heads, attn.n_kv_heads, attn.head_dim, dtype, device)
    if device.type == "cuda":
        print("warning: flashinfer is not installed (pip install 'expertmesh[gpu]'); paged attention "
              "runs the torch backend", file=sys.stderr)
    return TorchBackend.for_device(device, attn.n_kv_heads * attn.head_dim * dtype.itemsize)
