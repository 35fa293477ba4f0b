"""Synthetic weights (model/synthetic.py): any slice is generated on its own and equals the same
slice of the whole tensor; `materialize` fills a meta model, tied embeddings included."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from expertmesh.model.transformer import build_model
from expertmesh.model.moe import GroupedExperts
from expertmesh.model.synthetic import mark_shard, materialize, synthetic_values

SHAPE = (5, 4, 6)


@pytest.mark.parametrize("index", [
    [slice(1, 3), slice(None), slice(None)],
    [slice(None), slice(0, 4, 2), slice(5, 6)],
    [[4, 0, 2], slice(None), [5, 1]],  # index lists, out of order
    [[3], [1, 1], slice(2, 5)],
])
def test_a_slice_equals_the_same_slice_of_the_full_tensor(index):
    full = synthetic_values(7, "layers.0.moe.experts.w_up", SHAPE)
    part = synthetic_values(7, "layers.0.moe.experts.w_up", SHAPE, index)
    expected = full
    for dim, ix in enumerate(index):  # index one dimension at a time, as numpy's ix_ would
        expected = expected[(slice(None),) * dim + (ix if isinstance(ix, slice) else torch.tensor(ix),)]
    assert torch.equal(part, expected)


@settings(max_examples=25, deadline=None)
@given(rows=st.integers(1, 9), cols=st.integers(1, 9), data=st.data())
def test_random_index_lists_of_a_matrix_match_the_full_matrix(rows, cols, data):
    r = data.draw(st.lists(st.integers(0, rows - 1), max_size=rows))
    c = data.draw(st.lists(st.integers(0, cols - 1), max_size=cols))
    full = synthetic_values(1, "w", (rows, cols))
    assert torch.equal(synthetic_values(1, "w", (rows, cols), [r, c]), full[r][:, c])


def test_values_are_deterministic_and_differ_by_name_and_seed():
    a = synthetic_values(0, "embed.weight", (16, 8))
    assert torch.equal(a, synthetic_values(0, "embed.weight", (16, 8)))
    assert not torch.equal(a, synthetic_values(1, "embed.weight", (16, 8)))
    assert not torch.equal(a, synthetic_values(0, "lm_head.weight", (16, 8)))


def test_values_are_uniform_within_one_over_sqrt_fan_in():
    values = synthetic_values(0, "w", (256, 64))
    bound = 1 / 64**0.5
    assert values.dtype == torch.float32
    assert values.abs().max() <= bound
    assert values.abs().max() > 0.99 * bound
    assert abs(values.mean()) < 0.01 * bound
    assert values.unique().numel() > 0.99 * values.numel()


def test_norm_weights_are_ones():
    assert torch.equal(synthetic_values(0, "layers.1.attn_norm.weight", (8,)), torch.ones(8))
    assert torch.equal(synthetic_values(0, "norm.weight", (8,), [slice(2, 4)]), torch.ones(2))


def test_a_tensor_of_2_to_the_31_elements_is_refused():
    with pytest.raises(ValueError, match="split it"):
        synthetic_values(0, "huge", (2**16, 2**15))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_materialize_fills_every_parameter_with_its_named_values(dtype, small_config):
    cfg = small_config()
    model = materialize(build_model(cfg), seed=5, dtype=dtype)
    params = dict(model.named_parameters())
    # embed, norm, head; per layer 2 norms, 4 attention projections, router, up and down
    assert len(params) == 3 + 9 * cfg.n_layers
    for name, p in params.items():
        assert p.device.type == "cpu" and p.dtype == dtype and not p.requires_grad, name
        assert torch.equal(p, synthetic_values(5, name, p.shape).to(dtype)), name
    assert not model.training


def test_tied_embeddings_reuse_the_embedding_values(small_config):
    tied = materialize(build_model(small_config(tie_embeddings=True)), 0, torch.float32)
    assert torch.equal(tied.lm_head.weight, tied.embed.weight)
    untied = materialize(build_model(small_config()), 0, torch.float32)
    assert torch.equal(untied.embed.weight, tied.embed.weight)
    assert not torch.equal(untied.lm_head.weight, untied.embed.weight)


def test_a_marked_shard_of_experts_equals_those_experts_of_the_whole_module():
    whole = materialize(GroupedExperts(6, 8, 12, "swiglu"), 2, torch.float32)
    shard = GroupedExperts(2, 8, 12, "swiglu")
    for name, p in shard.named_parameters():
        mark_shard(shard, name, (6, *p.shape[1:]), ([4, 1], slice(None), slice(None)))
    materialize(shard, 2, torch.float32)
    for name in ("w_up", "w_down", "w_gate"):
        assert torch.equal(getattr(shard, name), getattr(whole, name)[[4, 1]]), name


def test_a_shard_of_the_wrong_shape_is_an_error():
    experts = GroupedExperts(2, 8, 12, "mlp")
    mark_shard(experts, "w_up", (6, 12, 8), ([0, 1, 2], slice(None), slice(None)))
    with pytest.raises(RuntimeError, match="shard of w_up"):
        materialize(experts, 0, torch.float32)
