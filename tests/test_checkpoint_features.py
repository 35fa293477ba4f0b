"""The model features Hugging Face families need (shared expert with its gate, q/k/v bias, q/k
norm over all heads) with synthetic weights: every deployment reproduces the single-device model
without transformers installed."""


import pytest
import torch

from expertmesh.config import Workload
from expertmesh.deployment import Deployment
from expertmesh.engine.spec import RunSpec
from expertmesh.engine.worker import run

FEATURES = dict(expert_kind="swiglu", shared_expert_hidden=96, qkv_bias=True, qk_norm=True,
                n_kv_heads=2)
WORKLOAD = Workload(batch_size=4, prompt_len=6, gen_len=4, seed=1)


def _run(cfg, deployment: str):
    return run(RunSpec(cfg, Deployment.parse(deployment), WORKLOAD, seed=5, record_logits=True, warmup=False),
               timeout=120)


@pytest.mark.parametrize("deployment", ["ep2", "tp2"])
def test_family_features_shard_exactly(small_config, deployment):
    cfg = small_config(**FEATURES)
    reference, result = _run(cfg, "single"), _run(cfg, deployment)
    assert torch.equal(result.tokens, reference.tokens)
    assert (result.logits - reference.logits).abs().max().item() < 1e-4


def test_tp_must_divide_the_shared_expert(small_config):
    with pytest.raises(ValueError, match="tp=2 must divide shared_expert_hidden=33"):
        Deployment(tp=2).validate(small_config(**{**FEATURES, "shared_expert_hidden": 33}))
