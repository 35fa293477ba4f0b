"""The safetensors files of a checkpoint directory: which file holds which tensor, and reads of
exactly the slices a rank needs.

Only safetensors are read: a checkpoint with only pickled weights (`*.bin`, `*.pt`) is rejected,
never unpickled. A file is opened (its header parsed, the data memory-mapped) the first time one
of its tensors is read; `get_slice(name)[index]` copies just the indexed elements, and those are
the bytes counted in `bytes_read`.

Block-quantized FP8 weights (DeepSeek-V3's release: `quantization_config` with quant_method fp8
and `weight_block_size` [br, bc]) hold `W.weight` in float8 `[R, C]` and `W.weight_scale_inv`
fp32 `[ceil(R / br), ceil(C / bc)]`; a read of `W.weight` returns its elements dequantized to
fp32 (each times its block's scale), reading the fp8 slice and the scales of the blocks it
touches only.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from pathlib import Path

import torch
from safetensors import safe_open

INDEX, SINGLE = "model.safetensors.index.json", "model.safetensors"
_PICKLED = ("*.bin", "*.pt", "*.pth", "*.ckpt")


def _weight_map(root: Path) -> dict[str, str]:
    """tensor name -> file name, from the index of a sharded checkpoint or the single file's header."""
    if (root / INDEX).is_file():
        try:
            weight_map = json.loads((root / INDEX).read_text())["weight_map"]
            if not isinstance(weight_map, dict):
                raise TypeError
        except (ValueError, KeyError, TypeError):
            raise ValueError(f"{root / INDEX} is not a safetensors index (JSON with a weight_map); "
                             f"download it again or re-save the checkpoint") from None
        for file in sorted(set(weight_map.values())):
            if not (root / file).is_file():
                raise ValueError(f"{root / file}: shard file listed in {INDEX} is missing; "
                                 f"download it again or re-save the checkpoint")
        return weight_map
    if (root / SINGLE).is_file():
        with safe_open(str(root / SINGLE), framework="pt") as f:
            return {name: SINGLE for name in f.keys()}
    if any(p for pattern in _PICKLED for p in root.glob(pattern)):
        raise ValueError(f"{root}: only pickled weights found; expertmesh reads safetensors only "
                         f"(it never unpickles a checkpoint); convert with transformers' "
                         f"save_pretrained(..., safe_serialization=True)")
    raise ValueError(f"{root}: neither {SINGLE} nor {INDEX} found; point --model at a Hugging Face "
                     f"model directory")


def _fp8_block(root: Path) -> tuple[int, int] | None:
    """`weight_block_size` of an fp8 block-quantized checkpoint's config.json, else None."""
    config = root / "config.json"
    quant = json.loads(config.read_text()).get("quantization_config") if config.is_file() else None
    if not quant:
        return None
    block = quant.get("weight_block_size")
    if quant.get("quant_method") != "fp8" or not (isinstance(block, list) and len(block) == 2):
        raise ValueError(f"{config}: quantization_config {quant} is not supported; only fp8 with a "
                         f"2-D weight_block_size (DeepSeek-V3's) is")
    return int(block[0]), int(block[1])


class CheckpointFiles:
    """Slices of the tensors of checkpoint directory `root`; `bytes_read` counts what was copied."""

    def __init__(self, root: str | Path):
        self.root = Path(root)
        self.weight_map = _weight_map(self.root)
        self._open: dict[str, object] = {}
        self.bytes_read = 0
        self.block = _fp8_block(self.root)

    def __contains__(self, name: str) -> bool:
        return name in self.weight_map

    def _slice(self, name: str, shape: Sequence[int]):
        """The lazy slice of tensor `name`, its shape checked against the expected `shape`."""
        if name not in self.weight_map:
            raise ValueError(f"{self.root}: tensor {name} is in no safetensors file; the checkpoint "
                             f"is incomplete or not of the family config.json names")
        file = self.weight_map[name]
        if file not in self._open:
            self._open[file] = safe_open(str(self.root / file), framework="pt")
        part = self._open[file].get_slice(name)
        if list(part.get_shape()) != list(shape):
            raise ValueError(f"{self.root / file}: tensor {name} has shape {list(part.get_shape())}, "
                             f"config.json implies {list(shape)}; use the config.json saved with "
                             f"these weights")
        return part

    def check(self, name: str, shape: Sequence[int]) -> None:
        """Raise unless tensor `name` is in the files with shape `shape` (reads its header only)."""
        self._slice(name, shape)

    def read(self, name: str, shape: Sequence[int], index: Sequence[slice]) -> torch.Tensor:
        """Elements `index` (one slice per dim) of tensor `name`, whose full shape must be `shape`."""
        values = self._slice(name, shape)[tuple(index)]
        self.bytes_read += values.nbytes
        scales = f"{name}_scale_inv"
        if self.block is None or scales not in self.weight_map:
            return values
        return self._dequantize(values, scales, shape, index)

    def _dequantize(self, values: torch.Tensor, scales: str, shape: Sequence[int],
                    index: Sequence[slice]) -> torch.Tensor:
        """fp8 `values` = elements `index` of a `[R, C]` weight -> fp32, times their blocks' scales."""
        (rows, cols), block = ([s.indices(n)[:2] for s, n in zip(index, shape)], self.block)
        grid = [math.ceil(n / b) for n, b in zip(shape, block)]
        first = [start // b for (start, _), b in zip((rows, cols), block)]
        last = [math.ceil(stop / b) for (_, stop), b in zip((rows, cols), block)]
        part = self._slice(scales, grid)[first[0]:last[0], first[1]:last[1]]
        self.bytes_read += part.nbytes
        full = part.float().repeat_interleave(block[0], 0).repeat_interleave(block[1], 1)
        r0, c0 = rows[0] - first[0] * block[0], cols[0] - first[1] * block[1]
        return values.float() * full[r0:r0 + values.shape[0], c0:c0 + values.shape[1]]

    def close(self) -> None:
        self._open.clear()
