"""Qwen3-MoE checkpoints: which layers are dense (as transformers builds them), each rank reading
only its slices, and `expertmesh run --model` on one. Parity with transformers under every
deployment is in `test_hf_parity.py`."""

import json

import pytest
import torch

transformers = pytest.importorskip("transformers", reason="Qwen3-MoE checkpoints are built with transformers")

from expertmesh.checkpoint import config_from_hf  # noqa: E402
from expertmesh.checkpoint.tiny import reference_greedy, save_tiny_checkpoint  # noqa: E402
from expertmesh.cli import main  # noqa: E402
from expertmesh.config import Workload  # noqa: E402
from expertmesh.deployment import Deployment  # noqa: E402
from expertmesh.engine.spec import RunSpec  # noqa: E402
from expertmesh.engine.worker import run  # noqa: E402


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """The tiny Qwen3-MoE of `save_tiny_checkpoint`: 3 layers, layer 1 dense, head_dim 24."""
    return save_tiny_checkpoint("qwen3_moe", tmp_path_factory.mktemp("qwen3_moe"), tokenizer=True)


@pytest.mark.parametrize("only,step", [([], 1), ([1], 1), ([], 2), ([0, 3], 3), ([5], 2)])
def test_dense_layers_are_those_transformers_builds_without_experts(tmp_path, only, step):
    config = transformers.Qwen3MoeConfig(num_hidden_layers=6, hidden_size=32, num_attention_heads=2,
                                         num_key_value_heads=1, head_dim=16, intermediate_size=24,
                                         moe_intermediate_size=8, num_experts=4, num_experts_per_tok=2,
                                         vocab_size=64, mlp_only_layers=only, decoder_sparse_step=step)
    config.save_pretrained(tmp_path)
    with torch.device("meta"):
        model = transformers.Qwen3MoeForCausalLM(config)
    theirs = [i for i, layer in enumerate(model.model.layers)
              if isinstance(layer.mlp, transformers.models.qwen3_moe.modeling_qwen3_moe.Qwen3MoeMLP)]
    cfg = config_from_hf(tmp_path)
    assert list(cfg.dense_layers) == theirs
    assert cfg.dense_hidden == (24 if theirs else 0)
    assert cfg.qk_head_norm and not cfg.qk_norm and cfg.head_dim == 16 and cfg.n_experts == 4


def test_ep2_ranks_read_their_experts_and_every_dense_layer(checkpoint):
    """Under ep2 each rank reads half the experts of the MoE layers and all of the rest (the dense
    layer's MLP included: it is data-parallel, like attention), and decodes transformers' tokens."""
    prompts = torch.tensor([[3, 1, 4, 1, 5], [9, 2, 6, 5, 3]])
    spec = RunSpec(config_from_hf(checkpoint), Deployment.parse("ep2"),
                   Workload(gen_len=8, prompt_ids=prompts.tolist()), warmup=False, checkpoint=str(checkpoint))
    result = run(spec, timeout=120)
    tokens, _ = reference_greedy(checkpoint, prompts, 8)
    assert torch.equal(result.tokens, tokens)
    total = sum(t.nbytes for t in _tensors(checkpoint).values())
    cfg = spec.cfg
    moe_layers = cfg.n_layers - len(cfg.dense_layers)
    expert_bytes = moe_layers * cfg.n_experts * 3 * cfg.d_model * cfg.expert_hidden * 4
    assert result.checkpoint_bytes == [total - expert_bytes // 2] * 2


def _tensors(path):
    from safetensors.torch import load_file
    return load_file(str(path / "model.safetensors"))


def test_run_command_on_a_qwen3_moe_checkpoint(checkpoint, capsys):
    assert main(["run", "--model", str(checkpoint), "--deployment", "tp2", "--prompt", "w5 w17 w3",
                 "--gen-len", "4", "--show-tokens"]) == 0
    tokens, _ = reference_greedy(checkpoint, torch.tensor([[5, 17, 3]]), 4)
    out = capsys.readouterr().out
    assert f"sequence 0: {tokens[0].tolist()}" in out
    assert "text 0: " + " ".join(f"w{t}" if t else "[UNK]" for t in tokens[0].tolist()) in out


def test_attention_bias_is_refused(tmp_path, checkpoint):
    raw = json.loads((checkpoint / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**raw, "attention_bias": True}))
    with pytest.raises(ValueError, match="attention_bias=true is not supported"):
        config_from_hf(tmp_path)
