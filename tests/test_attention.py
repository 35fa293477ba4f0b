"""Attention with rotary positions (model/attention.py): against a naive per-head softmax, and
incremental decode with a KV cache against recomputing the whole sequence."""

import math

import pytest
import torch

from expertmesh.model.attention import Attention, Contiguous
from expertmesh.model.synthetic import materialize

THETA = 10000.0


def naive_rotary(v: list[float], pos: int) -> list[float]:
    """Rotate the pairs (v[i], v[i + d/2]) by pos * theta^(-2i/d)."""
    half = len(v) // 2
    out = list(v)
    for i in range(half):
        angle = pos * THETA ** (-2 * i / len(v))
        a, b = v[i], v[i + half]
        out[i] = a * math.cos(angle) - b * math.sin(angle)
        out[i + half] = b * math.cos(angle) + a * math.sin(angle)
    return out


def naive_attention(attn: Attention, x: torch.Tensor) -> torch.Tensor:
    """Causal attention of one sequence x `[L, D]`, position by position and head by head."""
    h, g, d = attn.n_heads, attn.n_kv_heads, attn.head_dim
    L = x.shape[0]
    q, k, v = (x.double() @ w.weight.double().T for w in (attn.wq, attn.wk, attn.wv))
    heads = torch.zeros(L, h * d, dtype=torch.float64)
    for head in range(h):
        kv = head // (h // g)  # consecutive query heads share a KV head
        for i in range(L):
            qi = naive_rotary(q[i, head * d:(head + 1) * d].tolist(), i)
            scores = []
            for j in range(i + 1):
                kj = naive_rotary(k[j, kv * d:(kv + 1) * d].tolist(), j)
                scores.append(sum(a * b for a, b in zip(qi, kj)) / math.sqrt(d))
            z = sum(math.exp(s - max(scores)) for s in scores)
            for j, s in enumerate(scores):
                heads[i, head * d:(head + 1) * d] += math.exp(s - max(scores)) / z * v[j, kv * d:(kv + 1) * d]
    return heads @ attn.wo.weight.double().T


@pytest.mark.parametrize("n_kv_heads", [4, 2, 1])
def test_attention_equals_a_naive_causal_softmax_per_head(n_kv_heads):
    attn = materialize(Attention(d_model=16, n_heads=4, n_kv_heads=n_kv_heads, head_dim=8, theta=THETA),
                       seed=3, dtype=torch.float32)
    x = torch.randn(2, 6, 16, generator=torch.Generator().manual_seed(0))
    out = attn(x, Contiguous(None))
    for b in range(2):
        torch.testing.assert_close(out[b].double(), naive_attention(attn, x[b]), rtol=1e-5, atol=1e-5)


def test_attention_without_a_cache_must_start_at_position_zero():
    with pytest.raises(ValueError, match="without a KV cache"):
        Contiguous(None, slice(None), 3)


@pytest.mark.parametrize("n_kv_heads", [None, 2, 1], ids=["mha", "gqa2", "mqa"])
def test_incremental_decode_equals_full_recompute_at_every_step(n_kv_heads, small_model, cached_logits):
    model = small_model(n_kv_heads=n_kv_heads)
    assert model.cfg.n_kv_heads == (n_kv_heads or model.cfg.n_heads)
    ids = torch.randint(0, model.cfg.vocab_size, (3, 13), generator=torch.Generator().manual_seed(1))
    prompt_len = 5
    incremental = cached_logits(model, ids, prompt_len)
    with torch.inference_mode():
        full = model(ids, all_logits=True)[:, prompt_len - 1:]
    assert incremental.shape == full.shape == (3, 13 - prompt_len + 1, model.cfg.vocab_size)
    torch.testing.assert_close(incremental, full, rtol=1e-4, atol=1e-4)
