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


def moved_choices(path, change) -> tuple[int, int]:
    """(tokens whose experts differ, tokens) when transformers' layer-1 router of the checkpoint at
    `path` chooses again on its inputs of a forward over PROMPTS after `change(router)`."""
    model = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    inputs = []
    gate = model.model.layers[1].mlp.gate
    gate.register_forward_hook(lambda module, args, out: inputs.append(args[0].reshape(-1, args[0].shape[-1])))
    with torch.no_grad():
        model(PROMPTS)
        _, _, before = gate(inputs[0])
        change(gate)
        _, _, after = gate(inputs[0])
    return sum(set(a.tolist()) != set(b.tolist()) for a, b in zip(before, after)), len(before)


def test_the_correction_bias_changes_which_experts_transformers_chooses(checkpoint):
    """On the router inputs of the reference run, choosing without the bias picks other experts
    for many tokens: the parity tests do exercise bias-steered routing."""
    moved, tokens = moved_choices(checkpoint, lambda gate: gate.e_score_correction_bias.zero_())
    assert moved >= tokens // 4


@pytest.mark.parametrize("tp", [1, 2])
def test_the_kv_cache_holds_the_latent_per_token(checkpoint, tp):
    """Per token and layer: the latent and the RoPE key (kv_lora_rank + qk_rope_head_dim = 40)
    once, its values its keys, on every TP rank, in the engine's pools and the static loop's
    caches; full keys and values would be 4 heads x (24 + 24). A budget of one block's bytes (4
    tokens x 3 layers x 40 fp32) gets one block, twice that two."""
    cfg = config_from_hf(checkpoint)
    model = build_model(cfg)
    if tp > 1:
        model = apply_tensor_parallel(model, None, tp, 0)
    pools = model.make_pools(num_blocks=2, block_size=4)
    caches = model.make_caches(batch=3, max_len=5)
    assert all(p.v is p.k and p.nbytes == 2 * 4 * (32 + 8) * 4 for p in pools.values())
    assert all(c.v is c.k and c.nbytes == 3 * 5 * (32 + 8) * 4 for c in caches.values())
    assert 32 + 8 < 4 * (24 + 24)
    block = 4 * 3 * (32 + 8) * 4
    for blocks in (1, 2):
        engine = EngineConfig(block_size=4, kv_cache_gb=blocks * block / 2**30)
        assert pool_blocks(cfg, Deployment(tp=tp), engine) == blocks


def test_run_command_on_a_deepseek_v3_checkpoint(checkpoint, capsys):
    assert main(["run", "--model", str(checkpoint), "--deployment", "ep2", "--prompt", "w5 w17 w3",
                 "--gen-len", "4", "--show-tokens"]) == 0
    tokens, _ = reference_greedy(checkpoint, torch.tensor([[5, 17, 3]]), 4)
    assert f"sequence 0: {tokens[0].tolist()}" in capsys.readouterr().out


@pytest.mark.parametrize("deployment", ["single", "ep2", "tp2", "pp2"])
def test_simulator_counts_the_parameters_transformers_holds(checkpoint, deployment):
    """Summed over a stage's ranks: every transformers parameter (and router bias) once (EP: the
    routed experts split; TP: the per-head projections and every MLP split, the latent's and the
    low-rank query's first projections, norms and routers whole)."""
    from expertmesh.sim.memory import rank_params

    model = transformers.AutoModelForCausalLM.from_pretrained(checkpoint, dtype=torch.float32)
    whole = {n: t.numel() for n, t in [*model.named_parameters(), *model.named_buffers()]
             if n.endswith(("weight", "proj", "e_score_correction_bias"))}
    dep = Deployment.parse(deployment)
    tp_split = ("q_b_proj", "kv_b_proj", "o_proj", "experts", "gate_proj", "up_proj", "down_proj")
    split_by = ("mlp.experts.",) if dep.ep > 1 else tp_split if dep.tp > 1 else ()
    split = sum(v for n, v in whole.items() if any(s in n for s in split_by))
    held = sum(rank_params(config_from_hf(checkpoint), dep, r) for r in range(dep.world_size))
    assert held == split + dep.inner * (sum(whole.values()) - split)


def test_simulator_kv_bytes_are_the_engines_latent_pools(checkpoint):
    """The simulator's KV bytes for a workload equal what the engine's pools hold for its tokens."""
    from expertmesh.config import Workload
    from expertmesh.sim.memory import kv_cache_bytes

    cfg = config_from_hf(checkpoint)
    pools = build_model(cfg).make_pools(num_blocks=1, block_size=1)
    per_token = sum(p.nbytes for p in pools.values())
    assert per_token == 3 * (32 + 8) * 4  # 3 layers of the latent once, fp32
    workload = Workload(batch_size=3, prompt_len=10, gen_len=6)
    assert kv_cache_bytes(cfg, Deployment(tp=2), workload, 0) == per_token * 3 * 16


# DeepSeek-V3's published config.json (deepseek-ai/DeepSeek-V3) without its FP8 quantization_config,
# which the engine does not read yet
DEEPSEEK_V3_SHAPES = {
    "model_type": "deepseek_v3", "hidden_size": 7168, "num_hidden_layers": 61, "num_attention_heads": 128,
    "num_key_value_heads": 128, "intermediate_size": 18432, "moe_intermediate_size": 2048,
    "n_routed_experts": 256, "num_experts_per_tok": 8, "n_group": 8, "topk_group": 4, "n_shared_experts": 1,
    "first_k_dense_replace": 3, "routed_scaling_factor": 2.5, "norm_topk_prob": True, "kv_lora_rank": 512,
    "q_lora_rank": 1536, "qk_rope_head_dim": 64, "qk_nope_head_dim": 128, "v_head_dim": 128,
    "vocab_size": 129280, "max_position_embeddings": 163840, "rms_norm_eps": 1e-6, "rope_theta": 10000,
    "rope_scaling": {"beta_fast": 32, "beta_slow": 1, "factor": 40, "mscale": 1.0, "mscale_all_dim": 1.0,
                     "original_max_position_embeddings": 4096, "type": "yarn"},
    "scoring_func": "sigmoid", "topk_method": "noaux_tc", "torch_dtype": "bfloat16"}


def test_deepseek_v3_caches_1152_bytes_per_token_and_layer_and_gets_blocks_by_them(tmp_path):
    """DeepSeek-V3 in bf16: the latent 512 + 64 values, 1,152 B per token and layer, against
    128 heads x (192 + 128) values, 81,920 B, for full keys and values (71x). 10 GiB hold
    10 x 2^30 // (16 tokens x 1,152 B x 61 layers) blocks of 16 on every rank of single, ep32 and
    tp8 (the latent is whole on each TP rank), and the same over 31 layers under pp2."""
    import json

    (tmp_path / "config.json").write_text(json.dumps(DEEPSEEK_V3_SHAPES))
    cfg = config_from_hf(tmp_path)
    assert cfg.dtype == "bf16"
    pools = build_model(cfg).to(cfg.torch_dtype).make_pools(num_blocks=1, block_size=1)  # on meta
    assert {p.nbytes for p in pools.values()} == {(512 + 64) * 2} == {1152}
    assert 128 * (192 + 128) * 2 == 81920
    budget = EngineConfig(block_size=16, kv_cache_gb=10)
    for deployment in ("single", "ep32", "tp8"):
        assert pool_blocks(cfg, Deployment.parse(deployment), budget) == 10 * 2**30 // (16 * 1152 * 61) == 9549
    assert pool_blocks(cfg, Deployment(pp=2), budget) == 10 * 2**30 // (16 * 1152 * 31)


def test_simulate_command_takes_deepseek_v3_shapes(tmp_path, capsys):
    import json

    from expertmesh.sim.models import load_model

    (tmp_path / "config.json").write_text(json.dumps(DEEPSEEK_V3_SHAPES))
    cfg = load_model("paper", str(tmp_path))
    assert cfg.dense_layers == (0, 1, 2) and cfg.kv_per_token() == (1, 576) and cfg.yarn.factor == 40
    assert main(["simulate", "--model", str(tmp_path), "--deployments", "ep64", "--batch", "64",
                 "--prompt-len", "512", "--gen-len", "4"]) == 0
    assert "4 expert/layer" in capsys.readouterr().out


@pytest.mark.parametrize("deployment", ["single", "tp2"])
def test_yarn_rope_scaling_reproduces_transformers(tmp_path, deployment):
    """DeepSeek-V3's YaRN (as its published config has it, here with factor 4 over 64 original
    positions and mscale != mscale_all_dim, so that both the frequencies, the rotated parts'
    attention factor and the softmax scale change): transformers' greedy tokens and logits."""
    from test_hf_parity import GEN_LEN, PROMPTS as ALL, run_checkpoint, assert_matches

    yarn = {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0, "original_max_position_embeddings": 64,
            "beta_fast": 32, "beta_slow": 1, "mscale": 0.7, "mscale_all_dim": 1.0}
    path = save_tiny_checkpoint("deepseek_v3", tmp_path, rope_parameters=yarn)
    assert config_from_hf(path).yarn.factor == 4.0
    tokens, logits = reference_greedy(path, ALL, GEN_LEN)
    assert_matches(run_checkpoint(path, deployment), tokens, logits)


def test_the_group_limit_changes_which_experts_transformers_deepseek_v2_chooses(tmp_path):
    """DeepSeek-V2's test checkpoint (the parity tests' `deepseek_v2`, keeping 1 of 2 groups):
    choosing greedily over all experts moves transformers' choice for many tokens, so its parity
    tests do exercise group-limited routing."""
    path = save_tiny_checkpoint("deepseek_v2", tmp_path)
    assert config_from_hf(path).topk_groups == 1
    moved, tokens = moved_choices(path, lambda gate: setattr(gate, "topk_method", "greedy"))
    assert moved >= tokens // 4


@pytest.mark.parametrize("edit,message", [
    ({"norm_topk_prob": True}, "norm_topk_prob=true"),
    ({"scoring_func": "sigmoid"}, "scoring_func='sigmoid'"),
    ({"topk_method": "noaux_tc"}, "topk_method='noaux_tc'"),
])
def test_deepseek_v2_router_options_transformers_does_not_have_are_refused(tmp_path, edit, message):
    import json

    raw = json.loads((save_tiny_checkpoint("deepseek_v2", tmp_path / "ckpt") / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**raw, **edit}))
    with pytest.raises(ValueError, match=f"{message}.* is not supported"):
        config_from_hf(tmp_path)


@pytest.mark.parametrize("start", [0, 1000])
def test_simulated_latent_attention_flops_follow_the_form_mla_takes(tmp_path, start):
    """DeepSeek-V3's attention FLOPs for one sequence of 2048 new tokens, counted here from the
    architecture: after `start` cached positions the absorbed form (W_uk on the query, keys and
    values the latent's r + p per query-key pair and head, W_uv on the output); at position 0 the
    expanded form (kv_b per token, (n + p) + v per pair and head)."""
    import json

    from expertmesh.config import Workload
    from expertmesh.sim.hardware import get_profile
    from expertmesh.sim.program import _attention
    from expertmesh.sim.scenario import Scenario

    (tmp_path / "config.json").write_text(json.dumps(DEEPSEEK_V3_SHAPES))
    cfg = config_from_hf(tmp_path)
    sc = Scenario(cfg, Deployment(), Workload(batch_size=1, prompt_len=2048, gen_len=1), get_profile("h100"))
    D, h, n, p, v, r, q = 7168, 128, 128, 64, 128, 512, 1536
    L = 2048
    pairs = L * start + L * (L + 1) / 2
    per_token = q * D + h * (n + p) * q + (r + p) * D + D * h * v  # q_a, q_b, kv_a, wo
    if start == 0:
        per_token += h * (n + v) * r  # kv_b expands every token's latent
        per_pair = h * ((n + p) + v)
    else:
        per_token += h * n * r + h * v * r  # W_uk on the query, W_uv on the output
        per_pair = h * ((r + p) * 2)  # the cost model reads values r + p wide too (the cache's row)
    assert _attention(sc, ((1, L, start),)).flops == pytest.approx(2 * (L * per_token + pairs * per_pair))
