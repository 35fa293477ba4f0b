"""`simulate --model` on Qwen3-MoE configs: the engine's own reading of config.json (per-head
q/k norms, explicit head_dim, dense layers among MoE ones), parameters per rank as transformers
counts them, and a dense layer costed as its MLP (no router, no exchange)."""

import json

import pytest
import torch

from expertmesh.cli import main
from expertmesh.config import Workload
from expertmesh.deployment import Deployment
from expertmesh.sim.hardware import get_profile
from expertmesh.sim.memory import rank_params
from expertmesh.sim.models import load_model
from expertmesh.sim.program import Exchange, stage_program
from expertmesh.sim.scenario import Scenario

# Qwen3-30B-A3B's published shapes, with its first two layers made dense (mlp_only_layers) so
# that both kinds of layer are costed
QWEN3_JSON = {"model_type": "qwen3_moe", "architectures": ["Qwen3MoeForCausalLM"], "hidden_size": 2048,
              "num_hidden_layers": 48, "num_attention_heads": 32, "num_key_value_heads": 4, "head_dim": 128,
              "num_experts": 128, "num_experts_per_tok": 8, "moe_intermediate_size": 768,
              "intermediate_size": 6144, "norm_topk_prob": True, "mlp_only_layers": [0, 1],
              "decoder_sparse_step": 1, "vocab_size": 151936, "max_position_embeddings": 40960,
              "rms_norm_eps": 1e-6, "rope_theta": 1e6, "tie_word_embeddings": False,
              "torch_dtype": "bfloat16"}


def _write(tmp_path, raw):
    (tmp_path / "config.json").write_text(json.dumps(raw))
    return tmp_path


def test_a_qwen3_moe_config_is_read_as_the_engine_reads_it(tmp_path):
    cfg = load_model("paper", str(_write(tmp_path, QWEN3_JSON)))
    assert (cfg.n_experts, cfg.top_k, cfg.expert_hidden, cfg.head_dim) == (128, 8, 768, 128)
    assert cfg.dense_layers == (0, 1) and cfg.dense_hidden == 6144
    assert cfg.qk_head_norm and cfg.renormalize and cfg.dtype == "bf16"


@pytest.mark.parametrize("deployment", ["single", "ep2", "pp2", "tp2"])
def test_parameters_per_rank_are_what_transformers_holds(tmp_path, deployment):
    """Summed over a stage's ranks as each holds them: every transformers parameter once (EP: the
    experts split, the rest on every rank; TP: attention and MLPs split, norms, router and
    embeddings whole on every rank)."""
    transformers = pytest.importorskip("transformers", reason="the reference count is transformers' model")
    config = transformers.Qwen3MoeConfig(num_hidden_layers=4, hidden_size=64, num_attention_heads=4,
                                         num_key_value_heads=2, head_dim=24, intermediate_size=80,
                                         moe_intermediate_size=48, num_experts=8, num_experts_per_tok=2,
                                         vocab_size=128, mlp_only_layers=[2], decoder_sparse_step=2)
    config.save_pretrained(tmp_path)
    with torch.device("meta"):
        model = transformers.Qwen3MoeForCausalLM(config)
    dep = Deployment.parse(deployment)
    whole = {name: p.numel() for name, p in model.named_parameters()}
    # EP splits the experts; TP every projection (attention's, the experts', the dense MLP's)
    split_by = "experts" if dep.ep > 1 else "proj" if dep.tp > 1 else None
    split = sum(v for n, v in whole.items() if split_by and split_by in n)
    cfg = load_model("paper", str(tmp_path))
    held = sum(rank_params(cfg, dep, r) for r in range(dep.world_size))
    assert held == split + dep.inner * (sum(whole.values()) - split)


def test_a_dense_layer_is_costed_as_its_mlp_without_router_or_exchange(tmp_path):
    cfg = load_model("paper", str(_write(tmp_path, QWEN3_JSON)))
    sc = Scenario(cfg, Deployment(ep=8), Workload(batch_size=64, prompt_len=128, gen_len=2),
                  get_profile("h100"))
    t = 8  # each of the 8 ranks decodes 8 sequences
    prog = stage_program(sc, 0, [((8, 1, 128),)] * 8)
    assert (prog.n_layers, prog.n_dense) == (46, 2)
    assert any(isinstance(ph, Exchange) for ph in prog.layer)
    assert not any(isinstance(ph, Exchange) for ph in prog.dense)
    names = [ph.name for ph in prog.dense]
    assert "router" not in names
    [mlp] = [ph for ph in prog.dense if ph.name == "dense mlp"]
    assert all(c.flops == 3 * 2 * t * 2048 * 6144 for c in mlp.costs)


def test_simulate_command_takes_a_qwen3_moe_checkpoint_directory(tmp_path, capsys):
    path = _write(tmp_path, QWEN3_JSON)
    assert main(["simulate", "--model", str(path), "--deployments", "ep8,tp4", "--batch", "16",
                 "--prompt-len", "256", "--gen-len", "3"]) == 0
    printed = capsys.readouterr().out
    assert "schedule (ep8, 8 GPUs)" in printed and "schedule (tp4, 4 GPUs)" in printed
