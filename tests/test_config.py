"""ModelConfig, presets and Workload (config.py): what is accepted, and every error naming its field."""

import dataclasses

import pytest
import torch

from expertmesh.config import ModelConfig, Workload, parse_dtype, preset
from expertmesh.model.transformer import build_model, parameter_bytes

VALID = dict(name="t", n_layers=2, n_experts=4, top_k=2, d_model=64, n_heads=4, head_dim=16,
             expert_hidden=128, vocab_size=100, max_seq_len=32)


@pytest.mark.parametrize("field", ["n_layers", "n_experts", "top_k", "d_model", "n_heads",
                                   "head_dim", "expert_hidden", "vocab_size", "max_seq_len",
                                   "n_kv_heads"])
@pytest.mark.parametrize("value", [0, -2, 1.5, "8"])
def test_sizes_must_be_positive_integers(field, value):
    with pytest.raises(ValueError, match=f"ModelConfig.{field}=.*must be a positive integer"):
        ModelConfig(**{**VALID, field: value})


@pytest.mark.parametrize("changes, field, hint", [
    (dict(n_kv_heads=3), "n_kv_heads", "must divide n_heads=4; use a divisor of 4"),
    (dict(top_k=5), "top_k", "must be <= n_experts=4"),
    (dict(expert_kind="moe"), "expert_kind", "use one of: mlp, swiglu"),
    (dict(head_dim=15), "head_dim", "must be even"),
    (dict(rope_theta=0.0), "rope_theta", "must be > 0"),
    (dict(norm_eps=-1e-6), "norm_eps", "must be > 0"),
    (dict(dtype="fp16"), "dtype", "use one of: fp32, bf16"),
])
def test_each_inconsistent_field_is_named_with_what_would_fit(changes, field, hint):
    with pytest.raises(ValueError, match=f"ModelConfig.{field}=") as err:
        ModelConfig(**{**VALID, **changes})
    assert hint in str(err.value) and "\n" not in str(err.value)


def test_a_valid_config_fills_in_defaults_and_is_frozen():
    cfg = ModelConfig(**VALID)
    assert cfg.n_kv_heads == 4 and cfg.expert_kind == "mlp" and cfg.renormalize
    assert cfg.torch_dtype == torch.float32 and cfg.matrices_per_expert == 2
    assert cfg.with_(expert_kind="swiglu").matrices_per_expert == 3
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.n_layers = 3


def test_the_paper_preset_is_the_seed_model():
    cfg = preset("paper")
    assert (cfg.n_layers, cfg.n_experts, cfg.top_k) == (16, 16, 2)
    assert (cfg.d_model, cfg.n_heads, cfg.head_dim, cfg.n_kv_heads) == (4096, 32, 128, 32)
    assert (cfg.expert_hidden, cfg.expert_kind, cfg.dtype) == (16384, "mlp", "bf16")
    assert cfg.torch_dtype == torch.bfloat16


def test_the_paper_model_has_35_billion_parameters():
    L, E, D, H, V = 16, 16, 4096, 16384, 32000
    attention = 4 * D * (32 * 128)  # q, k, v, o: 32 heads x 128 (no grouped KV)
    experts = E * 2 * D * H  # up and down
    per_layer = attention + experts + E * D + 2 * D  # + router + two norms
    params = L * per_layer + 2 * V * D + D  # + embedding, untied head, final norm
    assert params == 35_696_807_936  # DESIGN.md: "35 B parameters (71 GB in BF16)"
    assert parameter_bytes(build_model(preset("paper")), torch.bfloat16) == 2 * params


@pytest.mark.parametrize("name", ["tiny", "small", "paper"])
def test_presets_are_valid_and_overridable(name):
    cfg = preset(name, dtype="fp32", n_layers=1)
    assert cfg.name == name and cfg.dtype == "fp32" and cfg.n_layers == 1
    assert preset(name).n_layers > 1  # the preset itself is unchanged


def test_overriding_n_heads_keeps_plain_multi_head_attention():
    assert preset("tiny", n_heads=4).n_kv_heads == 4
    assert preset("tiny", n_kv_heads=2).with_(n_heads=4).n_kv_heads == 2


def test_overrides_are_validated():
    with pytest.raises(ValueError, match="ModelConfig.top_k=17"):
        preset("tiny", top_k=17)


def test_an_unknown_preset_lists_the_known_ones():
    with pytest.raises(ValueError, match="unknown preset 'nope'; use one of: paper, tiny, small"):
        preset("nope")


def test_dtypes_parse_by_name():
    assert parse_dtype("bf16") == torch.bfloat16 and parse_dtype("fp32") == torch.float32
    with pytest.raises(ValueError, match="unknown dtype 'float8'; use one of: fp32, bf16"):
        parse_dtype("float8")


@pytest.mark.parametrize("kwargs, message", [
    (dict(batch_size=0), "batch size 0 must be at least 1"),
    (dict(prompt_len=0), "prompt length 0 must be at least 1"),
    (dict(gen_len=0), "generation length 0 must be at least 1"),
    (dict(temperature=-0.5), "temperature -0.5 must be >= 0"),
    (dict(top_p=0.0), r"top_p 0.0 must be in \(0, 1\]"),
    (dict(top_p=1.5), r"top_p 1.5 must be in \(0, 1\]"),
    (dict(prompt_ids=()), "prompt ids are empty"),
    (dict(prompt_ids=((1, 2), ())), "prompt ids are empty"),
])
def test_workload_errors(kwargs, message):
    with pytest.raises(ValueError, match=message):
        Workload(**kwargs)


def test_prompt_and_generation_must_fit_the_model():
    cfg = ModelConfig(**VALID)  # max_seq_len 32
    Workload(prompt_len=30, gen_len=2).validate_for(cfg)
    with pytest.raises(ValueError, match="30 \\+ generation length 3 = 33 exceeds the model's "
                                         "maximum length 32"):
        Workload(prompt_len=30, gen_len=3).validate_for(cfg)


@pytest.mark.parametrize("bad", [100, -1])
def test_token_ids_must_be_inside_the_vocabulary(bad):
    cfg = ModelConfig(**VALID)  # vocab 100
    Workload(prompt_ids=((0, 99),), gen_len=1).validate_for(cfg)
    with pytest.raises(ValueError, match=f"token id {bad} is outside the vocabulary \\[0, 100\\)"):
        Workload(prompt_ids=((0, bad),), gen_len=1).prompts(cfg)


def test_explicit_prompts_set_the_batch_and_prompt_length():
    w = Workload(batch_size=8, prompt_len=64, prompt_ids=([1, 2, 3], [4, 5, 6]), gen_len=2)
    assert (w.batch_size, w.prompt_len, w.total_len) == (2, 3, 5)
    assert w.prompts(ModelConfig(**VALID)).tolist() == [[1, 2, 3], [4, 5, 6]]


def test_synthetic_prompts_are_in_the_vocabulary_and_fixed_by_the_seed():
    cfg = ModelConfig(**VALID)
    a = Workload(batch_size=3, prompt_len=7, gen_len=1, seed=4).prompts(cfg)
    assert a.shape == (3, 7) and a.dtype == torch.int64
    assert 0 <= a.min() and a.max() < cfg.vocab_size
    assert torch.equal(a, Workload(batch_size=3, prompt_len=7, gen_len=1, seed=4).prompts(cfg))
    assert not torch.equal(a, Workload(batch_size=3, prompt_len=7, gen_len=1, seed=5).prompts(cfg))


def test_explicit_prompts_may_differ_in_length():
    w = Workload(prompt_ids=((1, 2, 3), (4,)), gen_len=2)
    assert (w.batch_size, w.prompt_len, w.total_len) == (2, 3, 5)
    assert w.prompt_lists(ModelConfig(**VALID)) == [(1, 2, 3), (4,)]
    with pytest.raises(ValueError, match="prompts have different lengths"):
        w.prompts(ModelConfig(**VALID))
