"""The model a simulation runs: a preset, or a Hugging Face `config.json` (no weights are read).

MoE families the engine loads (Mixtral, Qwen2-MoE, OLMoE, Qwen3-MoE, DeepSeek-V3, with their
dense layers and DeepSeek's latent attention) go through the engine's own `config_from_hf`, so
the simulator sees exactly the model the engine would build. Dense Llama / Qwen2 configs, which
the engine does not load, are read for their shapes only: a dense model is an MoE with one SwiGLU
expert that every token takes (top-1 of 1, whose router GEMM of one column is negligible), which
is the same arithmetic.
"""

from __future__ import annotations

import json
from pathlib import Path

from expertmesh.checkpoint.hf_config import FAMILIES, config_from_hf
from expertmesh.config import ModelConfig, preset

SHAPE_ONLY = ("llama", "qwen2")
_DTYPES = {"float32": "fp32", "bfloat16": "bf16", "float16": "bf16"}  # fp16 costs as bf16


def _read(path: Path) -> tuple[Path, dict]:
    file = path / "config.json" if path.is_dir() else path
    if not file.is_file():
        raise ValueError(f"{file} not found; give --model a Hugging Face config.json or a "
                         f"checkpoint directory holding one")
    try:
        raw = json.loads(file.read_text())
    except json.JSONDecodeError as exc:
        raise ValueError(f"{file} is not valid JSON ({exc}); fix the file") from None
    if not isinstance(raw, dict):
        raise ValueError(f"{file} must hold a JSON object; fix the file")
    return file, raw


def shape_config(raw: dict, name: str, file: Path) -> ModelConfig:
    """A dense Llama / Qwen2 config as a `ModelConfig` of the same shapes."""
    def get(key: str):
        if not isinstance(raw.get(key), (int, float)) or isinstance(raw.get(key), bool):
            raise ValueError(f"{file}: field {key!r} is missing or not a number; fix config.json")
        return raw[key]

    d_model, heads = get("hidden_size"), get("num_attention_heads")
    return ModelConfig(
        name=name, n_layers=get("num_hidden_layers"), d_model=d_model, n_heads=heads,
        n_kv_heads=raw.get("num_key_value_heads") or heads,
        head_dim=raw.get("head_dim") or d_model // heads, vocab_size=get("vocab_size"),
        max_seq_len=get("max_position_embeddings"), expert_kind="swiglu", n_experts=1, top_k=1,
        expert_hidden=get("intermediate_size"),
        tie_embeddings=bool(raw.get("tie_word_embeddings", False)),
        dtype=_DTYPES.get(raw.get("dtype") or raw.get("torch_dtype"), "bf16"))


def load_model(preset_name: str, path: str | None) -> ModelConfig:
    """`path` (a config.json or a directory holding one) if given, else the preset."""
    if path is None:
        return preset(preset_name)
    file, raw = _read(Path(path))
    family = raw.get("model_type")
    if family in FAMILIES:
        return config_from_hf(file.parent, dtype="bf16" if raw.get("torch_dtype", raw.get("dtype")) != "float32" else None)
    if family in SHAPE_ONLY:
        return shape_config(raw, file.parent.resolve().name, file)
    raise ValueError(f"{file}: model_type {family!r} cannot be simulated; use one of: "
                     f"{', '.join(FAMILIES + SHAPE_ONLY)}")
