"""Deterministic synthetic weights that any shard can generate on its own.

Every element of a parameter is a pure function of (seed, parameter name, global element index):
a 32-bit integer hash mapped to a uniform value in [-1/sqrt(fan_in), 1/sqrt(fan_in)]. A rank that
holds a slice of a weight (an expert, a block of heads, a block of hidden units) generates exactly
that slice, and it equals the same slice of the single-device reference's weight. No rank ever
builds the whole model.

The hash runs where the weight will live: on a GPU it is a few elementwise kernels per weight
(the paper model's 35 B weights in seconds, where one host thread per rank took minutes), and its
int32 arithmetic is the same on every device, so every deployment gets the same weights whichever
device made them. It runs over slabs of the leading dimension, so its temporaries stay small.

Parallel code records what slice a parameter holds with `mark_shard`; `materialize` then fills
every parameter of a model built on the `meta` device.
"""

from __future__ import annotations

import functools
import math
import zlib
from collections.abc import Callable, Sequence

import torch
from torch import nn

# Odd 32-bit multipliers of a xorshift-multiply hash. Arithmetic is int32 with two's-complement
# wrap-around (what torch does on CPU and CUDA); shifts are masked to act as logical shifts.
_MULTIPLIERS = (0x7FEB352D, -0x7B935975)

# Per-dimension index of a shard: a slice of the global dimension or an explicit list of indices.
DimIndex = slice | Sequence[int]
SLAB_ELEMENTS = 1 << 26  # elements hashed at once: bounds the int32 temporaries (256 MiB each)


def _mix(x: torch.Tensor) -> torch.Tensor:
    """A 32-bit integer hash on an int32 tensor."""
    x = x ^ ((x >> 16) & 0xFFFF)
    x = x * _MULTIPLIERS[0]
    x = x ^ ((x >> 15) & 0x1FFFF)
    x = x * _MULTIPLIERS[1]
    return x ^ ((x >> 16) & 0xFFFF)


def _dim_positions(index: DimIndex, size: int, device: torch.device) -> torch.Tensor:
    if isinstance(index, slice):
        return torch.arange(size, device=device)[index]
    return torch.as_tensor(list(index), dtype=torch.long).to(device)


def synthetic_values(seed: int, name: str, global_shape: Sequence[int],
                     index: Sequence[DimIndex] | None = None,
                     device: torch.device | str = "cpu") -> torch.Tensor:
    """The values at `index` of the synthetic parameter `name` of shape `global_shape` (fp32),
    computed on `device`.

    Norm weights (names ending in `norm.weight`) are ones, as a freshly built model has them.
    """
    index = list(index) if index is not None else [slice(None)] * len(global_shape)
    positions = [_dim_positions(ix, n, torch.device(device)) for ix, n in zip(index, global_shape)]
    shape = [len(p) for p in positions]
    if name.endswith("norm.weight"):
        return torch.ones(shape, device=device)
    strides = [1] * len(global_shape)
    for d in range(len(global_shape) - 2, -1, -1):
        strides[d] = strides[d + 1] * global_shape[d + 1]
    if math.prod(global_shape) >= 2**31:
        raise ValueError(f"synthetic weight {name} has over 2**31 elements; split it")
    key = zlib.crc32(f"{seed}:{name}".encode())
    key = key - 2**32 if key >= 2**31 else key  # as a signed int32
    fan_in = global_shape[-1] if len(global_shape) > 1 else 1
    out = torch.empty(shape, dtype=torch.float32, device=device)
    if not shape:
        return out
    offsets = [(p * s).to(torch.int32) for p, s in zip(positions, strides)]
    rows = max(1, SLAB_ELEMENTS // max(1, math.prod(shape[1:])))
    for start in range(0, shape[0], rows):
        slab = [offsets[0][start:start + rows], *offsets[1:]]
        linear = torch.zeros([len(slab[0]), *shape[1:]], dtype=torch.int32, device=device)
        for d, o in enumerate(slab):
            view = [1] * len(shape)
            view[d] = len(o)
            linear += o.view(view)
        bits = _mix(_mix(linear) ^ key)
        out[start:start + rows] = bits.to(torch.float32).mul_(2.0**-31 / fan_in**0.5)
    return out


def mark_shard(module: nn.Module, param: str, global_shape: Sequence[int],
               index: Sequence[DimIndex], source: str | None = None) -> None:
    """Record that `module.<param>` holds `index` of a global tensor of `global_shape`.

    `source` names the global tensor when it differs from the parameter's own name (tied weights).
    """
    shards = module.__dict__.setdefault("_shards", {})
    shards[param] = (tuple(global_shape), tuple(index), source)


def shard_of(module: nn.Module, param: str) -> tuple[tuple[int, ...], tuple, str | None] | None:
    return module.__dict__.get("_shards", {}).get(param)


def fill_parameters(model: nn.Module, values_of: Callable[[str, tuple, tuple | None], torch.Tensor],
                    dtype: torch.dtype, device: torch.device | str = "cpu") -> nn.Module:
    """Replace every (meta) parameter with `values_of(name, global_shape, index)`: the elements
    `index` (None: all) of global tensor `name` (the shard's `source` if marked, else the
    parameter's own name). Returns `model` in eval mode."""
    for module_name, module in model.named_modules():
        for pname, param in list(module._parameters.items()):
            if param is None:
                continue
            full_name = f"{module_name}.{pname}" if module_name else pname
            shard = shard_of(module, pname)
            global_shape, index, source = shard if shard else (tuple(param.shape), None, None)
            values = values_of(source or full_name, global_shape, index)
            if values.shape != param.shape:
                raise RuntimeError(f"shard of {full_name} is {tuple(values.shape)}, "
                                   f"parameter is {tuple(param.shape)}")
            module._parameters[pname] = nn.Parameter(values.to(device=device, dtype=dtype),
                                                     requires_grad=False)
    return model.eval()


def materialize(model: nn.Module, seed: int, dtype: torch.dtype,
                device: torch.device | str = "cpu") -> nn.Module:
    """Replace every (meta) parameter with its synthetic values, computed on `device`; returns
    `model` in eval mode."""
    return fill_parameters(model, functools.partial(synthetic_values, seed, device=device), dtype, device)
