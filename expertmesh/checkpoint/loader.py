"""Fill a rank's (meta) model shard with the weights of a Hugging Face checkpoint.

For every parameter, its shard mark (`shard_of`: global shape, per-dim index, source name) says
which elements of which global tensor it holds; `names.source_of` says where that global tensor
lives in the checkpoint; only those elements are read. A rank under ep4 thus reads its quarter of
the experts, the replicated attention and norms, and the embedding / LM head only where its
pipeline stage has them.

`check_checkpoint` raises, before any rank starts, the error any rank's load would: it walks the
same parameters over the whole model and checks each tensor's presence and shape in the files'
headers, reading no weights.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch
from torch import nn

from expertmesh.checkpoint.files import CheckpointFiles
from expertmesh.checkpoint.hf_config import read_hf_config
from expertmesh.checkpoint.names import Source, source_of
from expertmesh.config import ModelConfig
from expertmesh.model.synthetic import DimIndex, fill_parameters
from expertmesh.model.transformer import build_model


def _runs(index: Sequence[int]) -> list[slice]:
    """Explicit indices -> maximal runs of consecutive ones, as slices ([0, 1, 2, 5] -> 0:3, 5:6)."""
    runs: list[slice] = []
    for i in index:
        if runs and runs[-1].stop == i:
            runs[-1] = slice(runs[-1].start, i + 1)
        else:
            runs.append(slice(i, i + 1))
    return runs


def _read(files: CheckpointFiles, src: Source, index: Sequence[DimIndex]) -> torch.Tensor:
    """The elements `index` of the global parameter `src` describes (explicit lists only on dim 0)."""
    if any(not isinstance(ix, slice) for ix in index[1:]):
        raise ValueError("a shard indexes a dimension other than the first by a list; not loadable")
    first, rest = index[0], list(index[1:])
    if src.per_expert:
        experts = range(len(src.names))[first] if isinstance(first, slice) else first
        return torch.stack([files.read(src.names[e], src.shape, rest) for e in experts])
    if src.rows is not None:
        start, stop, _ = rest[0].indices(src.rows.stop - src.rows.start)
        rest[0] = slice(src.rows.start + start, src.rows.start + stop)
    runs = [first] if isinstance(first, slice) else _runs(first)
    return torch.cat([files.read(src.names[0], src.shape, [run, *rest]) for run in runs])


def load_checkpoint(model: nn.Module, path: str | Path, dtype: torch.dtype,
                    device: torch.device | str = "cpu") -> int:
    """Replace every (meta) parameter of `model` with its slice of the checkpoint at `path`, in
    `dtype` on `device`; the model is left in eval mode. Returns the bytes read from the files."""
    family = read_hf_config(path)["model_type"]
    files = CheckpointFiles(path)

    def values_of(name: str, global_shape: tuple, index: tuple | None) -> torch.Tensor:
        index = index or (slice(None),) * len(global_shape)
        return _read(files, source_of(family, name, global_shape, files), index)

    try:
        fill_parameters(model, values_of, dtype, device)
    finally:
        files.close()
    return files.bytes_read


def check_checkpoint(cfg: ModelConfig, path: str | Path) -> None:
    """Raise the ValueError (naming the file) that loading the checkpoint at `path` into the
    model of `cfg` would raise on some rank; reads only config.json and the files' headers."""
    family = read_hf_config(path)["model_type"]
    files = CheckpointFiles(path)

    def check(name: str, global_shape: tuple, index: tuple | None) -> torch.Tensor:
        src = source_of(family, name, global_shape, files)
        for tensor in src.names:
            files.check(tensor, src.shape)
        return torch.empty(global_shape, device="meta")

    try:
        fill_parameters(build_model(cfg), check, cfg.torch_dtype, "meta")
    finally:
        files.close()
