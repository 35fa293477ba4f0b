"""How many KV blocks a GPU rank's pool gets when the user gives neither `--num-blocks` nor
`--kv-cache-gb`: what is left, under `--gpu-memory-utilization` of the device, once the weights
are loaded and a forward's activations are set aside (vLLM's rule, with the activations estimated
instead of profiled).

    budget = utilization x total - (total - free) - activation reserve
    blocks = budget // bytes per block

`free` is read with this rank's weights already on the device, so `total - free` is the weights
plus whatever else holds memory there (the CUDA context, other processes). The ranks then agree on
the smallest count (`Engine`), since the replicas of a scheduler must.
"""

from __future__ import annotations

from expertmesh.config import ModelConfig
from expertmesh.deployment import Deployment

GIB = 2**30
# The estimate below counts the tensors a forward holds at once; the caching allocator's
# fragmentation and kernel workspaces (cuBLAS, attention) come on top: twice the count covers them.
ACTIVATION_SLACK = 2.0


def kv_blocks_from_memory(free: int, total: int, weights: int, activation_reserve: int,
                          per_block: int, utilization: float) -> int:
    """KV blocks that fit (formula above). ValueError (one line, with the figures and the fix)
    when not one does."""
    budget = utilization * total - (total - free) - activation_reserve
    blocks = int(budget // per_block)
    if blocks < 1:
        others = max(total - free - weights, 0)
        raise ValueError(
            f"no KV block ({per_block:,} bytes) fits under --gpu-memory-utilization {utilization} of "
            f"{total / GIB:.1f} GiB: weights take {weights / GIB:.1f} GiB, other allocations "
            f"{others / GIB:.1f} GiB, a forward's activations {activation_reserve / GIB:.1f} GiB; "
            f"raise --gpu-memory-utilization, lower --max-batched-tokens, or spread the model "
            f"over more GPUs")
    return blocks


def activation_reserve(cfg: ModelConfig, deployment: Deployment, max_batched_tokens: int,
                       max_seqs: int) -> int:
    """Bytes a forward of `max_batched_tokens` tokens holds at its peak on one rank, times
    `ACTIVATION_SLACK`: the residual and normed input `[t, D]` twice, attention's q, k, v and
    output `[t, (2h + 2g) d / tp]`, the MoE block's rows `[t k, D]` in and out with their hidden
    `[t k, (m - 1) H / tp]` (under EP a rank may receive every rank's rows: ep x), and fp32 logits
    `[max_seqs, V]`."""
    t, D, isz = max_batched_tokens, cfg.d_model, cfg.torch_dtype.itemsize
    attention = t * (2 * cfg.n_heads + 2 * cfg.n_kv_heads) * cfg.head_dim // deployment.tp
    rows = t * cfg.top_k * deployment.ep
    moe = rows * (2 * D + (cfg.matrices_per_expert - 1) * cfg.expert_hidden // deployment.tp)
    logits = max_seqs * cfg.vocab_size * 4
    return int(ACTIVATION_SLACK * ((4 * t * D + max(attention, moe)) * isz + logits))
