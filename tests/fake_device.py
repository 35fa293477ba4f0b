"""A pretend accelerator for tests on a CPU-only machine: tensors that say they are on another
device while their data stays on the CPU, so that code mixing host and device tensors fails here
as it would on a GPU, and every device-to-host copy (a host sync on a GPU) is counted.

The pretend device is `meta`: PyTorch has a device guard for it on every build (a `cuda` device
would need a CUDA build before any op reaches the mode), and code under test only ever names it
through `x.device`. What CUDA accepts, this accepts: 0-dim host tensors as scalars, and host index
tensors in indexing. `.tolist()` of a device tensor fails (subclasses do not support it): read
device values through `.cpu()`, which is counted.
"""

from __future__ import annotations

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten, tree_map

DEVICE = torch.device("meta")
# Ops CUDA accepts with host tensors among their arguments: index tensors may live on the host.
_HOST_INDICES_OK = {torch.ops.aten.index.Tensor, torch.ops.aten.index_put_.default,
                    torch.ops.aten.index_put.default}


class OnDevice(torch.Tensor):
    """CPU data `inner` presented as a tensor on `DEVICE`."""

    @staticmethod
    def __new__(cls, inner: torch.Tensor):
        return torch.Tensor._make_wrapper_subclass(cls, inner.shape, strides=inner.stride(),
                                                   dtype=inner.dtype, device=DEVICE)

    def __init__(self, inner: torch.Tensor):
        self.inner = inner

    def __repr__(self) -> str:
        return f"OnDevice({self.inner!r})"

    @classmethod
    def __torch_dispatch__(cls, func, types, args=(), kwargs=None):
        raise RuntimeError("use OnDevice tensors inside a FakeDevice mode")


class MixedDevices(RuntimeError):
    """An op got tensors on the device and on the host: CUDA would reject it."""


class FakeDevice(TorchDispatchMode):
    """Runs every op on the CPU data, keeps results on the pretend device, and
    - raises `MixedDevices` when an op mixes device tensors with host tensors of 1+ dimensions;
    - counts `syncs`: copies from the device to the host and reads of a device value."""

    def __init__(self):
        super().__init__()
        self.syncs = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        tensors = [t for t in tree_flatten((args, kwargs))[0] if isinstance(t, torch.Tensor)]
        on_device = [t for t in tensors if isinstance(t, OnDevice)]
        on_host = [t for t in tensors if not isinstance(t, OnDevice) and t.dim() > 0]
        if on_device and on_host and func not in _HOST_INDICES_OK:
            raise MixedDevices(f"{func} got tensors on {DEVICE} and on the host "
                               f"(host shapes {[tuple(t.shape) for t in on_host]})")
        wanted = kwargs.get("device")
        to_host = on_device and (func is torch.ops.aten._local_scalar_dense.default or (
            func is torch.ops.aten._to_copy.default and wanted is not None and torch.device(wanted).type == "cpu"))
        self.syncs += bool(to_host)
        if wanted is not None and torch.device(wanted).type == DEVICE.type:
            kwargs = {**kwargs, "device": torch.device("cpu")}
        out = func(*tree_map(lambda t: t.inner if isinstance(t, OnDevice) else t, args),
                   **tree_map(lambda t: t.inner if isinstance(t, OnDevice) else t, kwargs))
        keep = (on_device and not to_host) or (wanted is not None and torch.device(wanted).type == DEVICE.type)
        if not keep:
            return out
        return tree_map(lambda t: OnDevice(t) if isinstance(t, torch.Tensor) and not isinstance(t, OnDevice) else t, out)


def to_host(t: torch.Tensor) -> torch.Tensor:
    return t.inner if isinstance(t, OnDevice) else t


def move_to_device(module: torch.nn.Module) -> torch.nn.Module:
    """Every parameter of `module` as an `OnDevice` tensor (data unchanged)."""
    for sub in module.modules():
        for name, p in sub._parameters.items():
            if p is not None:
                sub._parameters[name] = OnDevice(p.detach())
    return module
