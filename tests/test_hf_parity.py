"""Hugging Face checkpoints of each supported family, loaded shard by shard under every kind of
deployment, give transformers' greedy tokens and logits (fp32)."""


import pytest
import torch

pytest.importorskip("transformers", reason="parity with transformers needs transformers installed")

from expertmesh.checkpoint import config_from_hf  # noqa: E402
from expertmesh.checkpoint.tiny import reference_greedy, save_tiny_checkpoint  # noqa: E402
from expertmesh.config import Workload  # noqa: E402
from expertmesh.deployment import Deployment  # noqa: E402
from expertmesh.engine.spec import RunSpec  # noqa: E402
from expertmesh.engine.worker import run  # noqa: E402

FP32_ATOL = 1e-4  # max |Δlogit| against transformers (observed about 1e-6)
GEN_LEN = 16
# 4 prompts: under ep4 each rank owns one sequence
PROMPTS = torch.tensor([[1, 5, 9, 13, 17], [2, 30, 4, 77, 8], [100, 3, 3, 3, 3], [64, 65, 66, 1, 2]])
DEPLOYMENTS = ["single", "ep2", "ep4", "tp2", "pp2", "ep2pp2", "tp2pp2"]


def run_checkpoint(path, deployment: str):
    """Greedy-decode PROMPTS with the checkpoint at `path` under `deployment`; logits recorded."""
    dep = Deployment.parse(deployment)
    workload = Workload(gen_len=GEN_LEN, prompt_ids=PROMPTS.tolist())
    spec = RunSpec(config_from_hf(path), dep, workload, record_logits=True, warmup=False,
                   checkpoint=str(path))
    return run(spec, timeout=120)


@pytest.fixture(scope="module", params=["mixtral", "qwen2_moe", "olmoe", "qwen3_moe", "deepseek_v3",
                                                       "deepseek_v2"])
def family_checkpoint(request, tmp_path_factory):
    """(path, transformers' tokens, transformers' logits) of a tiny random model of the family."""
    path = save_tiny_checkpoint(request.param, tmp_path_factory.mktemp(request.param))
    tokens, logits = reference_greedy(path, PROMPTS, GEN_LEN)
    return path, tokens, logits


def assert_matches(result, tokens, logits):
    assert torch.equal(result.tokens, tokens)
    assert (result.logits - logits).abs().max().item() < FP32_ATOL


@pytest.mark.parametrize("deployment", DEPLOYMENTS)
def test_checkpoint_reproduces_transformers(family_checkpoint, deployment):
    path, tokens, logits = family_checkpoint
    assert_matches(run_checkpoint(path, deployment), tokens, logits)


@pytest.mark.parametrize("family,deployment", [("mixtral", "ep2"), ("olmoe", "tp2"),
                                               ("qwen2_moe", "ep4"), ("qwen3_moe", "ep2"),
                                               ("deepseek_v3", "tp2")])
def test_fused_expert_tensors_load_like_per_expert_ones(tmp_path, family, deployment):
    """transformers 5 holds experts as stacked gate_up_proj / down_proj; a file written that way
    loads too (ep slices experts of the stack, tp slices rows of both halves of gate_up)."""
    path = save_tiny_checkpoint(family, tmp_path, fused=True)
    tokens, logits = reference_greedy(path, PROMPTS, GEN_LEN)
    assert_matches(run_checkpoint(path, deployment), tokens, logits)


@pytest.mark.parametrize("deployment", ["single", "pp2"])
def test_tied_embeddings_feed_the_lm_head_on_the_last_stage(tmp_path, deployment):
    path = save_tiny_checkpoint("qwen2_moe", tmp_path, tie_word_embeddings=True)
    assert config_from_hf(path).tie_embeddings
    tokens, logits = reference_greedy(path, PROMPTS, GEN_LEN)
    assert_matches(run_checkpoint(path, deployment), tokens, logits)
