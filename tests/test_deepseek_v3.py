"""DeepSeek-V3 checkpoints: the test model's correction biases really move the routing, the KV
cache holds the latent (not full keys and values), and `expertmesh run --model` on one. Parity
with transformers under every deployment is in `test_hf_parity.py`."""

import pytest
import torch

transformers = pytest.importorskip("transformers", reason="DeepSeek-V3 checkpoints are built with transformers")

from expertmesh.checkpoint import config_from_hf  # noqa: E402
from expertmesh.checkpoint.tiny import reference_greedy, save_tiny_checkpoint  # noqa: E402
from expertmesh.cli import main  # noqa: E402
from expertmesh.deployment import Deployment  # noqa: E402
from expertmesh.engine.engine import pool_blocks  # noqa: E402
from expertmesh.engine.scheduler import EngineConfig  # noqa: E402
from expertmesh.model.transformer import build_model  # noqa: E402
from expertmesh.parallel.tensor import apply_tensor_parallel  # noqa: E402

PROMPTS = torch.tensor([[1, 5, 9, 13, 17], [2, 30, 4, 77, 8]])


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return save_tiny_checkpoint("deepseek_v3", tmp_path_factory.mktemp("deepseek_v3"), tokenizer=True)


def test_the_correction_bias_changes_which_experts_transformers_chooses(checkpoint):
    """On the router inputs of the reference run, choosing without the bias picks other experts
    for many tokens: the parity tests do exercise bias-steered routing."""
    model = transformers.AutoModelForCausalLM.from_pretrained(checkpoint, dtype=torch.float32).eval()
    inputs = []
    gate = model.model.layers[1].mlp.gate
    gate.register_forward_hook(lambda module, args, out: inputs.append(args[0].reshape(-1, args[0].shape[-1])))
    with torch.no_grad():
        model(PROMPTS)
        _, _, biased = gate(inputs[0])
        gate.e_score_correction_bias.zero_()
        _, _, plain = gate(inputs[0])
    moved = sum(set(a.tolist()) != set(b.tolist()) for a, b in zip(biased, plain))
    assert moved >= len(biased) // 4


@pytest.mark.parametrize("tp", [1, 2])
def test_the_kv_cache_holds_the_latent_per_token(checkpoint, tp):
    """Per token and layer: the latent and the RoPE key (kv_lora_rank + qk_rope_head_dim = 40),
    stored as K and V, on every TP rank; full keys and values would be 4 heads x (24 + 24)."""
    cfg = config_from_hf(checkpoint)
    model = build_model(cfg)
    if tp > 1:
        model = apply_tensor_parallel(model, None, tp, 0)
    pools = model.make_pools(num_blocks=2, block_size=4)
    per_token = {name: (p.k[0, 0].numel() + p.v[0, 0].numel()) for name, p in pools.items()}
    assert set(per_token.values()) == {2 * (32 + 8)}
    assert 2 * (32 + 8) < 4 * (24 + 24)
    engine = EngineConfig(block_size=4, kv_cache_gb=2 * 40 * 4 * 4 * 3 / 2**30)
    assert pool_blocks(cfg, Deployment(tp=tp), engine) == 1  # exactly one block of 4 tokens x 3 layers


def test_run_command_on_a_deepseek_v3_checkpoint(checkpoint, capsys):
    assert main(["run", "--model", str(checkpoint), "--deployment", "ep2", "--prompt", "w5 w17 w3",
                 "--gen-len", "4", "--show-tokens"]) == 0
    tokens, _ = reference_greedy(checkpoint, torch.tensor([[5, 17, 3]]), 4)
    assert f"sequence 0: {tokens[0].tolist()}" in capsys.readouterr().out
