"""Tiny random Hugging Face checkpoints, and what transformers computes from them: the fixtures
of the parity tests, and a way to try `expertmesh run --model` without a download.

Needs `transformers` (imported on call). Weights are drawn with a larger spread than transformers'
default (std 0.02), so that router choices and greedy tokens are not near-ties that a float
rounding could flip.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

_COMMON = dict(vocab_size=128, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
               num_key_value_heads=2, max_position_embeddings=256, initializer_range=0.15,
               bos_token_id=None, eos_token_id=None, pad_token_id=None)
_CHAT_TEMPLATE = "{% for m in messages %}{{ m['content'] }} {% endfor %}"
_FAMILY = {
    "mixtral": ("MixtralConfig", "MixtralForCausalLM",
                dict(intermediate_size=96, num_local_experts=4, num_experts_per_tok=2)),
    "qwen2_moe": ("Qwen2MoeConfig", "Qwen2MoeForCausalLM",
                  dict(intermediate_size=96, moe_intermediate_size=48, num_experts=4,
                       num_experts_per_tok=2, shared_expert_intermediate_size=80)),
    "olmoe": ("OlmoeConfig", "OlmoeForCausalLM",
              dict(intermediate_size=48, num_experts=8, num_experts_per_tok=2)),
    # 3 layers, the middle one dense (mlp_only_layers), so that pp2 puts a dense layer beside an
    # MoE one on the first stage; head_dim 24 is not hidden / heads (16), as in real Qwen3-MoE.
    "qwen3_moe": ("Qwen3MoeConfig", "Qwen3MoeForCausalLM",
                  dict(num_hidden_layers=3, head_dim=24, intermediate_size=80,
                       moe_intermediate_size=48, num_experts=8, num_experts_per_tok=2,
                       norm_topk_prob=True, mlp_only_layers=[1])),
    # 3 layers, the first dense; 8 experts in 4 groups, 2 kept; latent attention with a low-rank
    # query; the routers' correction biases are drawn (save_tiny_checkpoint) so that they move
    # choices
    "deepseek_v3": ("DeepseekV3Config", "DeepseekV3ForCausalLM",
                    dict(num_hidden_layers=3, num_key_value_heads=4, intermediate_size=96,
                         moe_intermediate_size=32, n_routed_experts=8, num_experts_per_tok=2,
                         n_group=4, topk_group=2, n_shared_experts=1, first_k_dense_replace=1,
                         routed_scaling_factor=2.5, norm_topk_prob=True, kv_lora_rank=32,
                         q_lora_rank=48, qk_rope_head_dim=8, qk_nope_head_dim=16, v_head_dim=24)),
    # DeepSeek-V3's shapes with V2's routing (softmax, 2 groups of 4 ranked by their best expert,
    # 1 kept: fewer groups than experts per token, else the limit never changes a choice) and a
    # full-rank query
    "deepseek_v2": ("DeepseekV2Config", "DeepseekV2ForCausalLM",
                    dict(num_hidden_layers=3, num_key_value_heads=4, intermediate_size=96,
                         moe_intermediate_size=32, n_routed_experts=8, num_experts_per_tok=2,
                         n_group=2, topk_group=1, topk_method="group_limited_greedy", n_shared_experts=2,
                         first_k_dense_replace=1, routed_scaling_factor=2.5, kv_lora_rank=32,
                         q_lora_rank=None, qk_rope_head_dim=8, qk_nope_head_dim=16, v_head_dim=24)),
}


def save_tiny_checkpoint(family: str, path: str | Path, fused: bool = False,
                         max_shard_size: str | None = None, tokenizer: bool = False,
                         seed: int = 0, **overrides) -> Path:
    """Save a random 2-layer `family` model (hidden 64, 4 heads, 2 KV heads) at `path`, fp32.

    `fused`: write the expert weights as transformers holds them in memory (stacked
    `experts.gate_up_proj [E, 2H, D]`, `experts.down_proj [E, D, H]`) instead of the per-expert
    tensors `save_pretrained` writes. `max_shard_size` splits the weights over several files with
    an index. `tokenizer`: add a word-level `tokenizer.json` (words w0 .. w{vocab-1}) and a
    `tokenizer_config.json` whose chat template joins the messages' contents.
    """
    import transformers
    from safetensors.torch import save_file

    config_cls, model_cls, extra = _FAMILY[family]
    config = getattr(transformers, config_cls)(**{**_COMMON, **extra, **overrides})
    torch.manual_seed(seed)
    model = getattr(transformers, model_cls)(config).eval()
    for name, buffer in model.named_buffers():
        if name.endswith("e_score_correction_bias"):
            buffer.normal_(0.0, 0.2)
    path = Path(path)
    kwargs = {"max_shard_size": max_shard_size} if max_shard_size else {}
    model.save_pretrained(path, **kwargs)
    if fused:
        for file in path.glob("model*.safetensors*"):
            file.unlink()
        state = {k: v.contiguous() for k, v in model.state_dict().items()}
        if config.tie_word_embeddings:
            state.pop("lm_head.weight")
        save_file(state, str(path / "model.safetensors"), metadata={"format": "pt"})
    if tokenizer:
        _save_tokenizer(path, config.vocab_size)
    return path


def _save_tokenizer(path: Path, vocab_size: int) -> None:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    vocab = {"[UNK]": 0, **{f"w{i}": i for i in range(1, vocab_size)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.decoder = decoders.WordPiece()
    tok.save(str(path / "tokenizer.json"))
    # Without it transformers' AutoTokenizer takes the family's own tokenizer class, which does
    # not read a word-level tokenizer.json.
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "chat_template": _CHAT_TEMPLATE}
    (path / "tokenizer_config.json").write_text(json.dumps(config))


def reference_greedy(path, prompts: torch.Tensor, gen_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    """transformers' greedy decoding of `prompts [B, P]`: tokens `[B, gen_len]` and the logits
    `[B, gen_len, V]` each token was chosen from (one full forward per step, no cache).
    `path`: the checkpoint directory, or the transformers model loaded from it."""
    from transformers import AutoModelForCausalLM

    model = path
    if isinstance(path, (str, Path)):
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    ids, logits = prompts, []
    with torch.no_grad():
        for _ in range(gen_len):
            last = model(ids).logits[:, -1].float()
            logits.append(last)
            ids = torch.cat([ids, last.argmax(-1, keepdim=True)], dim=1)
    return ids[:, prompts.shape[1]:], torch.stack(logits, dim=1)
