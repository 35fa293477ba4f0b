"""Hugging Face checkpoints (Mixtral, Qwen2-MoE, OLMoE, Qwen3-MoE, DeepSeek-V3): config, sharded
safetensors loading, tokenizer. Build the rank's shard with `shard_model`, then `load_checkpoint`
instead of `materialize`."""

from expertmesh.checkpoint.hf_config import FAMILIES, config_from_hf, read_hf_config
from expertmesh.checkpoint.loader import check_checkpoint, load_checkpoint
from expertmesh.checkpoint.tokenizer import decode, encode, has_tokenizer

__all__ = ["FAMILIES", "check_checkpoint", "config_from_hf", "decode", "encode", "has_tokenizer", "load_checkpoint",
           "read_hf_config"]
