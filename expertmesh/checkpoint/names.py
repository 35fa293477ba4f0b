"""Where each expertmesh parameter lives in a Hugging Face checkpoint.

Prefix `model.layers.N.` omitted on the right; `moe` is `block_sparse_moe` (Mixtral files) or
`mlp`; expert projections (gate, up, down) are Mixtral's (w1, w3, w2), else (gate_proj, up_proj,
down_proj).

  embed.weight                      model.embed_tokens.weight
  norm.weight                       model.norm.weight
  lm_head.weight                    lm_head.weight (model.embed_tokens.weight when tied)
  layers.N.attn_norm.weight         input_layernorm.weight
  layers.N.moe_norm.weight          post_attention_layernorm.weight
  layers.N.attn.wq.{weight,bias}    self_attn.q_proj.{weight,bias}   (wk, wv, wo alike)
  layers.N.attn.q_norm.weight       self_attn.q_norm.weight          (k_norm alike)
  layers.N.moe.router.weight        moe.gate.weight
  layers.N.moe.experts.w_gate       [E, H, D]: moe.experts.{e}.gate.weight [H, D] for each e,
                                    or rows 0:H of the fused moe.experts.gate_up_proj [E, 2H, D]
  layers.N.moe.experts.w_up         likewise, rows H:2H of gate_up_proj
  layers.N.moe.experts.w_down       [E, D, H]: moe.experts.{e}.down.weight, or moe.experts.down_proj
  layers.N.moe.shared.w_gate.weight mlp.shared_expert.gate_proj.weight (w_up, w_down alike)
  layers.N.moe.shared.gate.weight   mlp.shared_expert_gate.weight
  layers.N.attn.q_head_norm.weight  self_attn.q_norm.weight [head_dim] (k_head_norm alike)
  layers.N.mlp.w_gate.weight        mlp.gate_proj.weight, a dense layer's (w_up, w_down alike)
DeepSeek-V3 and -V2 (latent attention, `model/mla.py`; router bias (V3's); shared experts without a gate):
  layers.N.attn.q_a.weight          self_attn.q_a_proj.weight (q_a_norm: q_a_layernorm, q_b: q_b_proj)
  layers.N.attn.kv_a.weight         self_attn.kv_a_proj_with_mqa.weight (kv_a_norm: kv_a_layernorm,
                                    kv_b: kv_b_proj)
  layers.N.moe.router.bias          mlp.gate.e_score_correction_bias
  layers.N.moe.shared.w_gate.weight mlp.shared_experts.gate_proj.weight (w_up, w_down alike)
"""

from __future__ import annotations

import re
from collections.abc import Container, Sequence
from dataclasses import dataclass

_PROJ = {
    "mixtral": {"w_gate": "w1", "w_up": "w3", "w_down": "w2"},
    "qwen2_moe": {"w_gate": "gate_proj", "w_up": "up_proj", "w_down": "down_proj"},
    "olmoe": {"w_gate": "gate_proj", "w_up": "up_proj", "w_down": "down_proj"},
    "qwen3_moe": {"w_gate": "gate_proj", "w_up": "up_proj", "w_down": "down_proj"},
    "deepseek_v3": {"w_gate": "gate_proj", "w_up": "up_proj", "w_down": "down_proj"},
    "deepseek_v2": {"w_gate": "gate_proj", "w_up": "up_proj", "w_down": "down_proj"},
}
_MOE_PREFIXES = {"mixtral": ("block_sparse_moe", "mlp"), "qwen2_moe": ("mlp",), "olmoe": ("mlp",),
                  "qwen3_moe": ("mlp",), "deepseek_v3": ("mlp",), "deepseek_v2": ("mlp",)}
_TOP = {"embed.weight": "model.embed_tokens.weight", "norm.weight": "model.norm.weight",
        "lm_head.weight": "lm_head.weight"}
_LAYER = {
    "attn_norm.weight": "input_layernorm.weight",
    "moe_norm.weight": "post_attention_layernorm.weight",
    "attn.q_norm.weight": "self_attn.q_norm.weight",
    "attn.k_norm.weight": "self_attn.k_norm.weight",
    "moe.shared.w_gate.weight": "mlp.shared_expert.gate_proj.weight",
    "moe.shared.w_up.weight": "mlp.shared_expert.up_proj.weight",
    "moe.shared.w_down.weight": "mlp.shared_expert.down_proj.weight",
    "moe.shared.gate.weight": "mlp.shared_expert_gate.weight",
    "attn.q_head_norm.weight": "self_attn.q_norm.weight",
    "attn.k_head_norm.weight": "self_attn.k_norm.weight",
    **{f"mlp.{ours}.weight": f"mlp.{theirs}.weight" for ours, theirs in _PROJ["qwen3_moe"].items()},
    **{f"attn.w{p}.{kind}": f"self_attn.{p}_proj.{kind}" for p in "qkvo" for kind in ("weight", "bias")},
}
_DEEPSEEK_LAYER = {
    "attn.q_a.weight": "self_attn.q_a_proj.weight",
    "attn.q_a_norm.weight": "self_attn.q_a_layernorm.weight",
    "attn.q_b.weight": "self_attn.q_b_proj.weight",
    "attn.kv_a.weight": "self_attn.kv_a_proj_with_mqa.weight",
    "attn.kv_a_norm.weight": "self_attn.kv_a_layernorm.weight",
    "attn.kv_b.weight": "self_attn.kv_b_proj.weight",
    "moe.router.bias": "mlp.gate.e_score_correction_bias",
    **{f"moe.shared.{ours}.weight": f"mlp.shared_experts.{theirs}.weight"
       for ours, theirs in _PROJ["deepseek_v3"].items()},
}
_LAYER_NAME = re.compile(r"layers\.(\d+)\.(.+)")


@dataclass(frozen=True)
class Source:
    """The checkpoint tensors of one global parameter.

    `per_expert`: `names[e]` is expert e's `[...]` slice of a parameter `[E, ...]`; otherwise
    `names[0]` is one tensor of shape `shape`, of which the parameter is rows `rows` of dim 1
    when given (a half of a fused gate_up tensor).
    """

    names: tuple[str, ...]
    shape: tuple[int, ...]
    per_expert: bool = False
    rows: slice | None = None


def source_of(family: str, name: str, global_shape: Sequence[int], present: Container[str]) -> Source:
    """The `Source` of expertmesh parameter `name` (global shape `global_shape`) in a checkpoint of
    `family` holding the tensors `present`; an expert weight may be stored either way."""
    shape = tuple(global_shape)
    if name in _TOP:
        return Source((_TOP[name],), shape)
    match = _LAYER_NAME.fullmatch(name)
    if match is None:
        raise ValueError(f"parameter {name} has no counterpart in a {family} checkpoint")
    layer, rest = match.groups()
    prefix = f"model.layers.{layer}."
    if rest == "moe.router.weight":
        names = [f"{prefix}{moe}.gate.weight" for moe in _MOE_PREFIXES[family]]
        return Source((next((n for n in names if n in present), names[0]),), shape)
    if rest.startswith("moe.experts."):
        return _expert_source(family, prefix, rest.removeprefix("moe.experts."), shape, present)
    if family in ("deepseek_v2", "deepseek_v3") and rest in _DEEPSEEK_LAYER:
        return Source((prefix + _DEEPSEEK_LAYER[rest],), shape)
    if rest not in _LAYER:
        raise ValueError(f"parameter {name} has no counterpart in a {family} checkpoint")
    return Source((prefix + _LAYER[rest],), shape)


def _expert_source(family: str, prefix: str, weight: str, shape: tuple[int, ...],
                   present: Container[str]) -> Source:
    E, rows = shape[0], shape[1]
    proj = _PROJ[family][weight]
    for moe in _MOE_PREFIXES[family]:
        per = tuple(f"{prefix}{moe}.experts.{e}.{proj}.weight" for e in range(E))
        if per[0] in present:
            return Source(per, shape[1:], per_expert=True)
        if weight == "w_down" and f"{prefix}{moe}.experts.down_proj" in present:
            return Source((f"{prefix}{moe}.experts.down_proj",), shape)
        fused = f"{prefix}{moe}.experts.gate_up_proj"
        if weight != "w_down" and fused in present:
            start = rows if weight == "w_up" else 0
            return Source((fused,), (E, 2 * rows, shape[2]), rows=slice(start, start + rows))
    moe = _MOE_PREFIXES[family][0]
    return Source(tuple(f"{prefix}{moe}.experts.{e}.{proj}.weight" for e in range(E)), shape[1:],
                  per_expert=True)
