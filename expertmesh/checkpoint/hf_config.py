"""`config.json` of a Hugging Face MoE checkpoint -> `ModelConfig`.

Families and what differs between them (all: SwiGLU experts, grouped-query attention, RoPE with
the half-split convention, RMSNorm, softmax router over all experts then top-k):

| model_type | router weights              | extras                                        |
|------------|-----------------------------|-----------------------------------------------|
| mixtral    | always renormalized         | -                                             |
| qwen2_moe  | renormalized if norm_topk_prob | shared expert + sigmoid gate, q/k/v bias   |
| olmoe      | renormalized if norm_topk_prob | RMSNorm on the whole q and k projections   |
| qwen3_moe  | renormalized if norm_topk_prob | RMSNorm per q / k head, explicit head_dim, |
|            |                             | dense MLP layers (mlp_only_layers, decoder_sparse_step) |
| deepseek_v3 | sigmoid + correction bias, group-limited, scaled | latent attention (MLA), YaRN, |
|            |                             | ungated shared experts, first_k_dense_replace dense layers, |
|            |                             | fp8 block-quantized weights (dequantized by `files.py`) |
| deepseek_v2 | softmax, group-limited (by each group's best), scaled, never renormalized | as deepseek_v3 |

Anything that would make the result differ from transformers (another activation, RoPE scaling,
dense layers between Qwen2-MoE layers, q/k/v clipping, attention biases where the family has none
by default) is rejected with a ValueError naming the field.
"""

from __future__ import annotations

import json
from pathlib import Path

from expertmesh.config import ModelConfig, Yarn

FAMILIES = ("mixtral", "qwen2_moe", "olmoe", "qwen3_moe", "deepseek_v3", "deepseek_v2")
# checkpoint dtype -> expertmesh dtype; fp16 is widened to fp32, which holds it exactly
_DTYPES = {"float32": "fp32", "bfloat16": "bf16", "float16": "fp32"}
# Numeric fields read from config.json, checked for their type before any arithmetic on them.
_INTEGERS = ("hidden_size", "num_attention_heads", "num_key_value_heads", "head_dim",
             "num_hidden_layers", "num_experts_per_tok", "vocab_size", "max_position_embeddings",
             "sliding_window", "num_local_experts", "num_experts", "intermediate_size",
             "moe_intermediate_size", "shared_expert_intermediate_size", "decoder_sparse_step",
             "n_routed_experts", "n_shared_experts", "n_group", "topk_group", "first_k_dense_replace",
             "kv_lora_rank", "q_lora_rank", "qk_rope_head_dim", "qk_nope_head_dim", "v_head_dim")
_REALS = ("rms_norm_eps", "rope_theta", "routed_scaling_factor")


def read_hf_config(path: str | Path) -> dict:
    """The parsed `config.json` of checkpoint directory `path`, its family and the types of its
    numeric fields checked."""
    file = Path(path) / "config.json"
    if not file.is_file():
        raise ValueError(f"{file} not found; point --model at a Hugging Face model directory "
                         f"(config.json + *.safetensors)")
    try:
        raw = json.loads(file.read_text())
    except ValueError as exc:
        raise ValueError(f"{file} is not valid JSON ({exc}); use the config.json saved with the "
                         f"weights") from None
    if not isinstance(raw, dict):
        raise ValueError(f"{file} holds a JSON {type(raw).__name__}, not an object of fields")
    _check_numbers(raw, file)
    family = raw.get("model_type")
    if family not in FAMILIES:
        arch = ", ".join(raw.get("architectures") or []) or "no architectures"
        raise ValueError(f"{file}: model_type {family!r} ({arch}) is not supported; use a "
                         f"checkpoint of one of: {', '.join(FAMILIES)}")
    return raw


def _check_numbers(raw: dict, file: Path) -> None:
    for kinds, keys, what in (((int,), _INTEGERS, "an integer"), ((int, float), _REALS, "a number")):
        for key in keys:
            value = raw.get(key)
            if value is not None and (isinstance(value, bool) or not isinstance(value, kinds)):
                raise ValueError(f"{file}: field {key!r} is {value!r}, which is not {what}; "
                                 f"write it as a JSON number")


def _get(raw: dict, key: str, file: Path):
    if key not in raw:
        raise ValueError(f"{file}: field {key!r} is missing; add it to config.json "
                         f"(transformers' save_pretrained writes it)")
    return raw[key]


def _rope_kind(raw: dict) -> tuple[str, dict]:
    """RoPE's type and parameters: transformers 5's `rope_parameters`, or older `rope_scaling`."""
    params = {**(raw.get("rope_scaling") or {}), **(raw.get("rope_parameters") or {})}
    return params.get("rope_type") or params.get("type") or "default", params


def _yarn(raw: dict, file: Path) -> Yarn | None:
    kind, params = _rope_kind(raw)
    if kind != "yarn":
        return None
    try:
        return Yarn(float(params["factor"]), int(params["original_max_position_embeddings"]),
                    float(params.get("beta_fast") or 32), float(params.get("beta_slow") or 1),
                    float(params.get("mscale") or 0), float(params.get("mscale_all_dim") or 0),
                    params.get("attention_factor"), bool(params.get("truncate", True)))
    except (KeyError, TypeError, ValueError) as exc:
        raise ValueError(f"{file}: yarn RoPE parameters {params} are incomplete or not numbers "
                         f"({exc}); fix rope_scaling") from None


def _rope_theta(raw: dict, file: Path, allowed: tuple[str, ...] = ("default",)) -> float:
    params = raw.get("rope_parameters") or {}
    kind, _ = _rope_kind(raw)
    if kind not in allowed:
        raise ValueError(f"{file}: rope_type {kind!r} is not supported; only {' or '.join(allowed)} "
                         f"RoPE is for this family, so remove rope scaling or use another checkpoint")
    theta = params.get("rope_theta", raw.get("rope_theta"))
    if theta is None:
        raise ValueError(f"{file}: no rope_theta (in rope_parameters or top level); add it")
    _check_numbers({"rope_theta": theta}, file)
    return float(theta)


def _reject(ok: bool, file: Path, what: str) -> None:
    if not ok:
        raise ValueError(f"{file}: {what} is not supported; use a checkpoint without it")


def _dense_layers(raw: dict, n_layers: int, file: Path) -> dict:
    """Qwen3-MoE's rule (as transformers builds the layers): layer i is dense when it is in
    `mlp_only_layers` or (i + 1) is not a multiple of `decoder_sparse_step`."""
    only, step = raw.get("mlp_only_layers") or [], raw.get("decoder_sparse_step", 1)
    if not (isinstance(only, list) and all(isinstance(i, int) and not isinstance(i, bool) for i in only)):
        raise ValueError(f"{file}: field 'mlp_only_layers' is {only!r}, not a list of layer "
                         f"indices; write it as a JSON list of integers")
    if step < 1:
        raise ValueError(f"{file}: field 'decoder_sparse_step' is {step}; it must be >= 1")
    dense = tuple(i for i in range(n_layers) if i in only or (i + 1) % step)
    if not dense:
        return {}
    return dict(dense_layers=dense, dense_hidden=_get(raw, "intermediate_size", file))


def _deepseek_router(raw: dict, file: Path) -> dict:
    """DeepSeek-V3's router (sigmoid, noaux_tc) or DeepSeek-V2's (softmax, greedy or
    group_limited_greedy, as transformers' DeepseekV2TopkRouter: weights never renormalized)."""
    scoring, method = raw.get("scoring_func"), raw.get("topk_method")
    if raw["model_type"] == "deepseek_v3":
        _reject((scoring or "sigmoid") == "sigmoid" and (method or "noaux_tc") == "noaux_tc", file,
                f"scoring_func={scoring!r} / topk_method={method!r}")
        return dict(router_kind="sigmoid_grouped", renormalize=bool(raw.get("norm_topk_prob", False)),
                    n_groups=raw.get("n_group") or 1, topk_groups=raw.get("topk_group") or 1)
    _reject((scoring or "softmax") == "softmax" and (method or "greedy") in ("greedy", "group_limited_greedy"),
            file, f"scoring_func={scoring!r} / topk_method={method!r}")
    _reject(not raw.get("norm_topk_prob"), file, "norm_topk_prob=true (DeepSeek-V2 weights are not renormalized)")
    grouped = method == "group_limited_greedy"
    return dict(router_kind="softmax_grouped", renormalize=False,
                n_groups=(raw.get("n_group") or 1) if grouped else 1,
                topk_groups=(raw.get("topk_group") or 1) if grouped else 1)


def _deepseek(raw: dict, fields: dict, file: Path) -> dict:
    """DeepSeek-V3's and -V2's fields: the router, shared experts, leading dense layers and latent
    attention."""
    g = lambda key: _get(raw, key, file)  # noqa: E731
    _reject(not raw.get("attention_bias"), file, "attention_bias=true")
    quant = raw.get("quantization_config")
    _reject(quant is None or quant.get("quant_method") == "fp8", file,
            f"quantization_config {quant} (only fp8 block quantization is read)")
    moe_hidden, first_dense = g("moe_intermediate_size"), raw.get("first_k_dense_replace") or 0
    nope, rope = g("qk_nope_head_dim"), g("qk_rope_head_dim")
    return dict(
        n_experts=raw.get("n_routed_experts") or g("num_local_experts"), expert_hidden=moe_hidden,
        **_deepseek_router(raw, file), routed_scaling=float(raw.get("routed_scaling_factor", 1.0)),
        shared_expert_hidden=(raw.get("n_shared_experts") or 0) * moe_hidden, shared_expert_gate=False,
        dense_layers=tuple(range(min(first_dense, fields["n_layers"]))),
        dense_hidden=g("intermediate_size") if first_dense else 0,
        n_kv_heads=fields["n_heads"], head_dim=nope + rope, qk_rope_head_dim=rope,
        v_head_dim=g("v_head_dim"), kv_lora_rank=g("kv_lora_rank"), q_lora_rank=raw.get("q_lora_rank") or 0,
        # transformers' DeepseekV2 always rotates interleaved pairs (it saves rope_interleave null)
        rope_interleave=raw["model_type"] == "deepseek_v2" or bool(raw.get("rope_interleave", True)),
        yarn=_yarn(raw, file))


def config_from_hf(path: str | Path, dtype: str | None = None) -> ModelConfig:
    """The `ModelConfig` of the checkpoint at `path`; `dtype` (fp32, bf16) overrides the file's."""
    raw = read_hf_config(path)
    file = Path(path) / "config.json"
    family = raw["model_type"]
    g = lambda key: _get(raw, key, file)  # noqa: E731
    _reject(raw.get("hidden_act", "silu") == "silu", file, f"hidden_act={raw.get('hidden_act')!r}")
    d_model, n_heads = g("hidden_size"), g("num_attention_heads")
    max_len = g("max_position_embeddings")
    windowed = family not in ("qwen2_moe", "qwen3_moe") or raw.get("use_sliding_window")
    if raw.get("sliding_window") and windowed:
        max_len = min(max_len, raw["sliding_window"])  # within the window attention is full
    fields = dict(
        name=Path(path).resolve().name, n_layers=g("num_hidden_layers"), top_k=g("num_experts_per_tok"),
        d_model=d_model, n_heads=n_heads, n_kv_heads=raw.get("num_key_value_heads") or n_heads,
        head_dim=raw.get("head_dim") or d_model // n_heads, vocab_size=g("vocab_size"),
        max_seq_len=max_len, expert_kind="swiglu",
        rope_theta=_rope_theta(raw, file, ("default", "yarn") if family.startswith("deepseek") else ("default",)),
        norm_eps=g("rms_norm_eps"), tie_embeddings=bool(raw.get("tie_word_embeddings", False)),
        dtype=dtype or _DTYPES.get(raw.get("dtype") or raw.get("torch_dtype"), "fp32"),
    )
    if family == "mixtral":
        fields.update(n_experts=g("num_local_experts"), expert_hidden=g("intermediate_size"),
                      renormalize=True)
    elif family == "qwen2_moe":
        _reject(not raw.get("mlp_only_layers") and raw.get("decoder_sparse_step", 1) == 1, file,
                "a dense MLP layer (mlp_only_layers, decoder_sparse_step > 1)")
        fields.update(n_experts=g("num_experts"), expert_hidden=g("moe_intermediate_size"),
                      renormalize=bool(raw.get("norm_topk_prob", False)),
                      shared_expert_hidden=g("shared_expert_intermediate_size"),
                      qkv_bias=bool(raw.get("qkv_bias", True)))
    elif family == "qwen3_moe":
        _reject(not raw.get("attention_bias"), file, "attention_bias=true")
        # published configs say num_experts; transformers 5 saves it as num_local_experts
        experts = raw.get("num_experts") or g("num_local_experts")
        fields.update(n_experts=experts, expert_hidden=g("moe_intermediate_size"),
                      renormalize=bool(raw.get("norm_topk_prob", False)), qk_head_norm=True,
                      **_dense_layers(raw, g("num_hidden_layers"), file))
    elif family.startswith("deepseek"):
        fields.update(_deepseek(raw, fields, file))
    else:
        _reject(raw.get("clip_qkv") is None, file, f"clip_qkv={raw.get('clip_qkv')}")
        _reject(not raw.get("attention_bias"), file, "attention_bias=true")
        _reject(fields["head_dim"] * n_heads == d_model, file, "head_dim * heads != hidden_size")
        fields.update(n_experts=g("num_experts"), expert_hidden=g("intermediate_size"),
                      renormalize=bool(raw.get("norm_topk_prob", False)), qk_norm=True)
    return ModelConfig(**fields)


def eos_ids(path: str | Path) -> tuple[int, ...]:
    """The end-of-sequence token ids of checkpoint directory `path`: `eos_token_id` (an id or a
    list) of `generation_config.json`, else of `config.json`; () when neither names one."""
    for name in ("generation_config.json", "config.json"):
        file = Path(path) / name
        if file.is_file():
            value = json.loads(file.read_text()).get("eos_token_id")
            if value is not None:
                return tuple(value) if isinstance(value, list) else (int(value),)
    return ()
