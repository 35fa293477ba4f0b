"""The preallocated KV cache (model/attention.py KVCache, MoETransformer.make_caches): where it
writes, what it returns, and micro-batches that each use their own rows of one cache."""

import torch

from expertmesh.model.attention import KVCache


def test_update_writes_its_rows_and_positions_and_returns_the_cached_prefix():
    cache = KVCache(batch=4, max_len=6, n_kv_heads=2, head_dim=3, dtype=torch.float32,
                    device=torch.device("cpu"))
    k1, v1 = torch.full((2, 3, 2, 3), 1.0), torch.full((2, 3, 2, 3), -1.0)
    k, v = cache.update(slice(1, 3), 0, k1, v1)
    assert k.shape == v.shape == (2, 3, 2, 3) and torch.equal(k, k1) and torch.equal(v, v1)

    k2, v2 = torch.full((2, 1, 2, 3), 2.0), torch.full((2, 1, 2, 3), -2.0)
    k, v = cache.update(slice(1, 3), 3, k2, v2)
    assert k.shape == (2, 4, 2, 3)
    assert torch.equal(k[:, :3], k1) and torch.equal(k[:, 3:], k2) and torch.equal(v[:, 3:], v2)
    # rows 0 and 3 and positions 4.. are untouched
    assert not cache.k[[0, 3]].any() and not cache.v[[0, 3]].any() and not cache.k[:, 4:].any()


def test_a_keys_only_cache_holds_and_writes_its_keys_once_as_its_values():
    """Latent attention's cache: one tensor `[batch, max_len, g, d]`, returned as keys and values."""
    cache = KVCache(batch=2, max_len=5, n_kv_heads=1, head_dim=3, dtype=torch.float32,
                    device=torch.device("cpu"), keys_only=True)
    assert cache.v is cache.k and cache.nbytes == 2 * 5 * 1 * 3 * 4
    latent = torch.arange(2 * 4 * 3, dtype=torch.float32).view(2, 4, 1, 3)
    k, v = cache.update(slice(None), 0, latent, latent)
    assert torch.equal(k, latent) and torch.equal(v, latent) and not cache.k[:, 4:].any()


def test_make_caches_gives_each_layer_a_cache_of_its_kv_heads(small_model):
    model = small_model(n_kv_heads=2)
    caches = model.make_caches(batch=3, max_len=10)
    cfg = model.cfg
    assert sorted(caches) == [str(i) for i in range(cfg.n_layers)]
    for cache in caches.values():
        assert cache.k.shape == cache.v.shape == (3, 10, 2, cfg.head_dim) and cache.v is not cache.k
        assert cache.k.dtype == torch.float32
        assert cache.nbytes == 2 * 3 * 10 * 2 * cfg.head_dim * 4


def test_micro_batches_on_their_rows_of_one_cache_equal_full_recompute(small_model, cached_logits):
    """Rows 0, 1-2, none, 3-4: each micro-batch prefills and decodes on its own slice."""
    model = small_model(n_kv_heads=2)
    ids = torch.randint(0, model.cfg.vocab_size, (5, 10), generator=torch.Generator().manual_seed(2))
    parts = [slice(0, 1), slice(1, 3), slice(3, 3), slice(3, 5)]
    micro = cached_logits(model, ids, 4, parts)
    with torch.inference_mode():
        full = model(ids, all_logits=True)[:, 3:]
    torch.testing.assert_close(micro, full, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(micro, cached_logits(model, ids, 4), rtol=1e-4, atol=1e-4)


def test_a_sequence_does_not_see_the_other_rows_of_the_cache(small_model, cached_logits):
    model = small_model()
    ids = torch.randint(0, model.cfg.vocab_size, (2, 8), generator=torch.Generator().manual_seed(3))
    changed = ids.clone()
    changed[0] = (changed[0] + 1) % model.cfg.vocab_size
    before, after = cached_logits(model, ids, 3), cached_logits(model, changed, 3)
    torch.testing.assert_close(before[1], after[1], rtol=1e-5, atol=1e-5)
    assert not torch.allclose(before[0], after[0])
