"""FP8 block-quantized DeepSeek-V3 checkpoints (`weight_scale_inv`) are dequantized on load: the
result is transformers' on the same weights dequantized naively here, under deployments that
read partial blocks (tp2 splits rows and columns mid-block, ep2 reads some experts)."""

import json
import math

import pytest
import torch

pytest.importorskip("transformers", reason="the reference is transformers on the dequantized weights")

from safetensors.torch import load_file, save_file  # noqa: E402

from expertmesh.checkpoint.tiny import reference_greedy, save_tiny_checkpoint  # noqa: E402
from test_hf_parity import GEN_LEN, PROMPTS, assert_matches, run_checkpoint  # noqa: E402

BLOCK = 32  # splits the tiny model's 48-row q_b shard and 80-row kv_b shard inside a block under tp2
FP8_MAX = torch.finfo(torch.float8_e4m3fn).max


def quantize(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per BLOCK x BLOCK block: scale = max |w| / FP8_MAX, w8 = w / scale in float8."""
    R, C = math.ceil(w.shape[0] / BLOCK), math.ceil(w.shape[1] / BLOCK)
    scale = torch.empty(R, C)
    w8 = torch.empty(w.shape, dtype=torch.float8_e4m3fn)
    for i in range(R):
        for j in range(C):
            rows, cols = slice(i * BLOCK, (i + 1) * BLOCK), slice(j * BLOCK, (j + 1) * BLOCK)
            block = w[rows, cols]
            scale[i, j] = block.abs().max() / FP8_MAX
            w8[rows, cols] = (block / scale[i, j]).to(torch.float8_e4m3fn)
    return w8, scale


def dequantize(w8: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    out = w8.float()
    for i in range(scale.shape[0]):
        for j in range(scale.shape[1]):
            out[i * BLOCK:(i + 1) * BLOCK, j * BLOCK:(j + 1) * BLOCK] *= scale[i, j]
    return out


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """(fp8 checkpoint, transformers' tokens and logits on its naively dequantized weights).
    Quantized as DeepSeek's release is: every projection in the layers (not the routers, norms,
    embedding or head)."""
    ref = save_tiny_checkpoint("deepseek_v3", tmp_path_factory.mktemp("ref"))
    fp8 = tmp_path_factory.mktemp("fp8")
    state = load_file(str(ref / "model.safetensors"))
    quantized = {}
    for name, w in state.items():
        if ".layers." in name and name.endswith("proj.weight"):
            w8, scale = quantize(w)
            state[name] = dequantize(w8, scale)
            quantized[name], quantized[name + "_scale_inv"] = w8, scale
        else:
            quantized[name] = w
    save_file(state, str(ref / "model.safetensors"), metadata={"format": "pt"})
    save_file(quantized, str(fp8 / "model.safetensors"), metadata={"format": "pt"})
    config = json.loads((ref / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic",
                                     "weight_block_size": [BLOCK, BLOCK]}
    (fp8 / "config.json").write_text(json.dumps(config))
    tokens, logits = reference_greedy(ref, PROMPTS, GEN_LEN)
    return fp8, tokens, logits


@pytest.mark.parametrize("deployment", ["single", "tp2", "ep2"])
def test_fp8_weights_are_dequantized_on_load(checkpoints, deployment):
    path, tokens, logits = checkpoints
    assert_matches(run_checkpoint(path, deployment), tokens, logits)
