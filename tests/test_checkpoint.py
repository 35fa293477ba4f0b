"""Reading Hugging Face checkpoints: config.json, sharded files, per-rank slices and the bytes they
cost, the `--model` / `--prompt` command line, and a one-line error for every way a checkpoint or
deployment can be wrong."""

import json
import shutil

import pytest
import torch

pytest.importorskip("transformers", reason="tiny checkpoints are built with transformers")

from expertmesh.checkpoint import config_from_hf, load_checkpoint  # noqa: E402
from expertmesh.checkpoint.tiny import reference_greedy, save_tiny_checkpoint  # noqa: E402
from expertmesh.cli import main  # noqa: E402
from expertmesh.config import Workload  # noqa: E402
from expertmesh.deployment import Deployment  # noqa: E402
from expertmesh.engine.spec import RunSpec  # noqa: E402
from expertmesh.engine.worker import run  # noqa: E402
from expertmesh.model.transformer import build_model  # noqa: E402


@pytest.fixture(scope="module")
def sharded(tmp_path_factory):
    """A Mixtral checkpoint split over several files with model.safetensors.index.json."""
    path = save_tiny_checkpoint("mixtral", tmp_path_factory.mktemp("sharded"), max_shard_size="40KB")
    assert len(list(path.glob("model-*.safetensors"))) > 2
    return path


def _copy(src, tmp_path):
    return shutil.copytree(src, tmp_path / "copy")


def test_config_maps_each_family_field(tmp_path):
    qwen = config_from_hf(save_tiny_checkpoint("qwen2_moe", tmp_path / "q", norm_topk_prob=True))
    assert (qwen.n_experts, qwen.expert_hidden, qwen.shared_expert_hidden) == (4, 48, 80)
    assert qwen.qkv_bias and qwen.renormalize and not qwen.qk_norm
    assert (qwen.n_heads, qwen.n_kv_heads, qwen.head_dim, qwen.norm_eps) == (4, 2, 16, 1e-6)
    olmoe = config_from_hf(save_tiny_checkpoint("olmoe", tmp_path / "o"))
    assert olmoe.qk_norm and not olmoe.renormalize and olmoe.shared_expert_hidden == 0
    mixtral = config_from_hf(save_tiny_checkpoint("mixtral", tmp_path / "m", rope_theta=5e5,
                                                  sliding_window=64))
    assert mixtral.renormalize and mixtral.rope_theta == 5e5 and mixtral.max_seq_len == 64
    assert config_from_hf(tmp_path / "m", dtype="bf16").dtype == "bf16"


def test_ep4_ranks_read_only_their_experts_from_a_sharded_checkpoint(sharded):
    """Each rank reads exactly the bytes of the parameters it holds (fp32 file, fp32 model): its
    quarter of the experts plus the replicated rest, much less than the whole checkpoint."""
    prompts = torch.tensor([[3, 1, 4, 1, 5], [9, 2, 6, 5, 3], [5, 8, 9, 7, 9], [3, 2, 3, 8, 4]])
    spec = RunSpec(config_from_hf(sharded), Deployment.parse("ep4"),
                   Workload(gen_len=16, prompt_ids=prompts.tolist()), warmup=False,
                   checkpoint=str(sharded))
    result = run(spec, timeout=120)
    tokens, _ = reference_greedy(sharded, prompts, 16)
    assert torch.equal(result.tokens, tokens)
    assert result.checkpoint_bytes == result.param_bytes
    total = json.loads((sharded / "model.safetensors.index.json").read_text())["metadata"]["total_size"]
    cfg = spec.cfg
    expert_bytes = cfg.n_layers * cfg.n_experts * 3 * cfg.d_model * cfg.expert_hidden * 4
    assert all(b == total - expert_bytes * 3 // 4 for b in result.checkpoint_bytes)


def test_run_command_generates_from_token_ids(sharded, capsys):
    assert main(["run", "--model", str(sharded), "--deployment", "ep2", "--prompt-ids", "1,2,3",
                 "--gen-len", "4", "--show-tokens"]) == 0
    tokens, _ = reference_greedy(sharded, torch.tensor([[1, 2, 3]]), 4)
    assert f"sequence 0: {tokens[0].tolist()}" in capsys.readouterr().out


def test_run_command_encodes_a_text_prompt_and_prints_text(tmp_path, capsys):
    path = save_tiny_checkpoint("olmoe", tmp_path, tokenizer=True)
    assert main(["run", "--model", str(path), "--prompt", "w5 w17 w3", "--gen-len", "4"]) == 0
    tokens, _ = reference_greedy(path, torch.tensor([[5, 17, 3]]), 4)
    expected = " ".join(f"w{t}" if t else "[UNK]" for t in tokens[0].tolist())
    assert f"text 0: {expected}" in capsys.readouterr().out


def test_text_prompt_without_a_tokenizer_is_an_error(sharded, cli_error):
    line = cli_error(["run", "--model", str(sharded), "--prompt", "hello"])
    assert "tokenizer.json not found" in line and "--prompt-ids" in line


def test_unsupported_architecture_names_config_json(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama",
                                                      "architectures": ["LlamaForCausalLM"]}))
    with pytest.raises(ValueError, match=r"config.json: model_type 'llama' \(LlamaForCausalLM\) "
                                         r"is not supported; use a checkpoint of one of: mixtral"):
        config_from_hf(tmp_path)


def test_unsupported_options_are_rejected(tmp_path):
    path = save_tiny_checkpoint("olmoe", tmp_path, clip_qkv=8.0)
    with pytest.raises(ValueError, match="clip_qkv=8.0 is not supported"):
        config_from_hf(path)


def test_missing_shard_file_is_named(sharded, tmp_path):
    path = _copy(sharded, tmp_path)
    gone = sorted(path.glob("model-*.safetensors"))[1]
    gone.unlink()
    with pytest.raises(ValueError, match=rf"{gone.name}: shard file listed in "
                                         r"model.safetensors.index.json is missing; download it"):
        load_checkpoint(build_model(config_from_hf(path)), path, torch.float32)


def test_missing_tensor_is_named(sharded, tmp_path):
    path = _copy(sharded, tmp_path)
    index = json.loads((path / "model.safetensors.index.json").read_text())
    del index["weight_map"]["model.layers.1.self_attn.k_proj.weight"]
    (path / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(ValueError, match="tensor model.layers.1.self_attn.k_proj.weight is in no "
                                         "safetensors file"):
        load_checkpoint(build_model(config_from_hf(path)), path, torch.float32)


def test_tensor_of_the_wrong_shape_is_named(sharded, tmp_path):
    path = _copy(sharded, tmp_path)
    raw = json.loads((path / "config.json").read_text())
    raw["intermediate_size"] = 64
    (path / "config.json").write_text(json.dumps(raw))
    with pytest.raises(ValueError, match=r"tensor model.layers.0.block_sparse_moe.experts.0.w\d.weight "
                                         r"has shape \[\d+, \d+\], config.json implies"):
        load_checkpoint(build_model(config_from_hf(path)), path, torch.float32)


def test_pickled_weights_are_refused_not_unpickled(tmp_path):
    path = save_tiny_checkpoint("mixtral", tmp_path)
    (path / "model.safetensors").unlink()
    (path / "pytorch_model.bin").write_bytes(b"not a pickle: must never be opened")
    with pytest.raises(ValueError, match="reads safetensors only"):
        load_checkpoint(build_model(config_from_hf(path)), path, torch.float32)


@pytest.mark.parametrize("deployment,message", [
    ("ep3", "ep=3 must divide the 4 experts"),
    ("tp4", "tp=4 must divide n_kv_heads=2"),
    ("tp3", "tp=3 must divide n_heads=4"),
])
def test_deployment_that_does_not_divide_the_model_is_refused(sharded, deployment, message):
    dep = Deployment.parse(deployment)
    spec = RunSpec(config_from_hf(sharded), dep, Workload(), checkpoint=str(sharded))
    with pytest.raises(ValueError, match=message):
        spec.validate(dep.world_size)
