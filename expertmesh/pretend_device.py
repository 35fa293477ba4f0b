"""A pretend accelerator for tests and `expertmesh profile` on a CPU-only machine: tensors that
say they are on another device while their data stays on the CPU, so that code mixing host and
device tensors fails here as it would on a GPU, and every device-to-host copy (a host sync on a
GPU) is counted.

The pretend device is `meta`: PyTorch has a device guard for it on every build (a `cuda` device
would need a CUDA build before any op reaches the mode), and code under test only ever names it
through `x.device`. What CUDA accepts, this accepts: 0-dim host tensors as scalars, and host index
tensors in indexing. Reads of device values (`.cpu()`, `.item()`, `int(t)`, `.tolist()`, `if t`)
are counted as `syncs`, and so are ops whose output size depends on device values (`nonzero`,
a boolean mask index, `unique`, `bincount`, `repeat_interleave` without `output_size`): CUDA
reads the size on the host.

Copies the other way are counted too, as `uploads`: `t.to(device)` of a host tensor, and
`torch.tensor(data, device=...)` / `torch.as_tensor(data, device=...)`, which the mode builds on
the host and copies up as CUDA does. A blocking one (`non_blocking=False`, what `torch.tensor`
does) is also a host sync on CUDA (the copy waits for the stream), and is counted again in
`blocking_uploads`, as is every host index tensor handed to a device tensor's indexing
(`x[list]`, `x[host_tensor]`: CUDA copies the indices up first, blocking). A non-blocking one
waits for nothing on CUDA when its source is pinned, which this machine cannot check: code
under test pins where the device is CUDA. `device_buffer.copy_(host_tensor, non_blocking=...)`,
a copy up into a persistent buffer (what a CUDA graph's inputs need), is an upload too. Each
upload's host bytes add up in `upload_bytes` (what crosses the bus).

With `record_shapes`, every op's output shapes are kept in `shapes` (op name, shapes), so that a
test can check that a forward allocates by a bucket's size and not by its batch's.
"""

from __future__ import annotations

import traceback

import torch
from torch.overrides import TorchFunctionMode
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

    def tolist(self):
        """As on CUDA: a copy to the host (counted by the mode), then its values."""
        return self.cpu().tolist()

    # PyTorch turns a list index into an index tensor on the indexed tensor's device below the
    # mode (on CUDA: a blocking copy up); here it stays a host tensor, which the mode counts.
    def __getitem__(self, index):
        return super().__getitem__(_host_lists(index))

    def __setitem__(self, index, value):
        return super().__setitem__(_host_lists(index), value)

    @classmethod
    def __torch_dispatch__(cls, func, types, args=(), kwargs=None):
        raise RuntimeError("use OnDevice tensors inside a FakeDevice mode")


def _host_lists(index):
    if isinstance(index, tuple):
        return tuple(_host_lists(i) for i in index)
    if isinstance(index, list):
        return torch.tensor(index, dtype=torch.bool if index and isinstance(index[0], bool) else torch.long)
    return index


class MixedDevices(RuntimeError):
    """An op got tensors on the device and on the host: CUDA would reject it."""


class _FromData(TorchFunctionMode):
    """`torch.tensor` / `torch.as_tensor` of Python data onto `DEVICE` never reach a dispatch mode
    (PyTorch builds them below it): build them on the host and copy them up, through the mode."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        device = kwargs.get("device")
        onto_device = device is not None and torch.device(device).type == DEVICE.type
        if func in (torch.tensor, torch.as_tensor) and onto_device:
            host = func(*args, **{**kwargs, "device": "cpu"})
            return host.to(DEVICE, non_blocking=False)  # what PyTorch's copy from data does
        return func(*args, **kwargs)


class FakeDevice(TorchDispatchMode):
    """Runs every op on the CPU data, keeps results on the pretend device, and
    - raises `MixedDevices` when an op mixes device tensors with host tensors of 1+ dimensions;
    - counts `syncs`: copies from the device to the host and reads of a device value;
    - counts `uploads`: copies from the host to the device, and `blocking_uploads`, those of
      them that are not `non_blocking`; `upload_bytes` sums their host tensors' bytes."""

    def __init__(self, record_shapes: bool = False):
        super().__init__()
        self.record_shapes = record_shapes
        self.shapes: list[tuple[str, tuple]] = []
        self.syncs = 0
        self.uploads = 0
        self.blocking_uploads = 0
        self.upload_bytes = 0
        self.events: list[str] = []  # each counted copy or read, and where the code did it
        self._from_data = _FromData()

    def __enter__(self):
        self._from_data.__enter__()
        return super().__enter__()

    def __exit__(self, *exc):
        try:
            return super().__exit__(*exc)
        finally:
            self._from_data.__exit__(*exc)

    def counts(self) -> tuple[int, int, int]:
        """(syncs, uploads, blocking_uploads) so far."""
        return self.syncs, self.uploads, self.blocking_uploads

    def _note(self, what: str, func) -> None:
        """Keep where the code under test did it (its innermost frame outside torch and this file)."""
        frame = next((f for f in reversed(traceback.extract_stack())
                      if "/torch/" not in f.filename and not f.filename.endswith(("fake_device.py", "pretend_device.py"))), None)
        where = f"{'/'.join(frame.filename.split('/')[-2:])}:{frame.lineno} {frame.line}" if frame else "?"
        self.events.append(f"{what}: {func} at {where}")

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        flat = tree_flatten((args, kwargs))[0]
        tensors = [t for t in flat if isinstance(t, torch.Tensor)]
        on_device = [t for t in tensors if isinstance(t, OnDevice)]
        on_host = [t for t in tensors if not isinstance(t, OnDevice) and t.dim() > 0]
        upload_into = func is aten.copy_.default and isinstance(args[0], OnDevice) and not isinstance(args[1], OnDevice)
        if on_device and on_host and func not in _HOST_INDICES_OK and not upload_into:
            raise MixedDevices(f"{func} got tensors on {DEVICE} and on the host "
                               f"(host shapes {[tuple(t.shape) for t in on_host]})")
        if upload_into:
            self.uploads += 1
            self.upload_bytes += args[1].nbytes
            non_blocking = kwargs.get("non_blocking", args[2] if len(args) > 2 else False)
            self.blocking_uploads += not non_blocking
            self._note("upload" if non_blocking else "blocking upload", func)
        elif on_device and on_host:  # CUDA copies host indices to the device first, blocking
            self.uploads += len(on_host)
            self.upload_bytes += sum(t.nbytes for t in on_host)
            self.blocking_uploads += len(on_host)
            self._note("blocking upload (host indices)", func)
        # the device an op asks for: a keyword, or positional (`aten.to.device` under inference mode)
        wanted = next((torch.device(d).type for d in flat if isinstance(d, torch.device)), None)
        copy = func in _COPIES
        to_host = bool(on_device) and (func in _READS or (copy and wanted == "cpu"))
        sync = to_host or (bool(on_device) and _size_from_data(func, args, kwargs))
        self.syncs += sync
        if sync:
            self._note("sync", func)
        to_device = wanted == DEVICE.type
        if to_device and copy and not isinstance(args[0], OnDevice):
            self.uploads += 1
            self.upload_bytes += args[0].nbytes
            positional = args[3] if func is torch.ops.aten.to.device and len(args) > 3 else False
            non_blocking = kwargs.get("non_blocking", positional)
            self.blocking_uploads += not non_blocking
            self._note("upload" if non_blocking else "blocking upload", func)
        unwrap = (lambda t: t.inner if isinstance(t, OnDevice) else
                  torch.device("cpu") if isinstance(t, torch.device) and t.type == DEVICE.type else t)
        out = func(*tree_map(unwrap, args), **tree_map(unwrap, kwargs))
        keep = (on_device and not to_host) or to_device
        if self.record_shapes and keep:
            self.shapes.append((str(func), tuple(tuple(t.shape) for t in tree_flatten(out)[0]
                                                 if isinstance(t, torch.Tensor))))
        if not keep:
            return out
        # Wrappers made in inference mode would be inference tensors, which cannot be views of the
        # normal tensors made outside it (the KV pools, the weights): all wrappers are normal ones.
        with torch.inference_mode(False):
            return tree_map(_wrap, out)


aten = torch.ops.aten
# Copies between devices, as they reach a dispatch mode (the `to` overloads under inference mode).
_COPIES = {aten._to_copy.default, aten.to.device, aten.to.dtype_layout}
# Reads of a device value into a Python number (`item` and `is_nonzero` under inference mode).
_READS = {aten._local_scalar_dense.default, aten.item.default, aten.is_nonzero.default, aten.equal.default}
# Ops whose output size depends on device values: CUDA reads them on the host to allocate it.
_SIZED_BY_DATA = {aten.nonzero.default, aten.masked_select.default, aten.bincount.default,
                  aten._unique2.default, aten.unique_dim.default, aten.unique_consecutive.default}


def _size_from_data(func, args, kwargs) -> bool:
    if func in _SIZED_BY_DATA:
        return True
    if func in (aten.repeat_interleave.Tensor, aten.repeat_interleave.self_Tensor):
        return kwargs.get("output_size") is None
    if func in _HOST_INDICES_OK:  # a boolean mask index becomes positions through nonzero
        return any(isinstance(i, OnDevice) and i.dtype in (torch.bool, torch.uint8)
                   for i in tree_flatten(args[1])[0])
    return False


def _wrap(t):
    return OnDevice(t) if isinstance(t, torch.Tensor) and not isinstance(t, OnDevice) else t


def to_host(t: torch.Tensor) -> torch.Tensor:
    return t.inner if isinstance(t, OnDevice) else t


def move_to_device(module: torch.nn.Module) -> torch.nn.Module:
    """Every parameter of `module` as an `OnDevice` tensor (data unchanged)."""
    for sub in module.modules():
        for name, p in sub._parameters.items():
            if p is not None:
                sub._parameters[name] = OnDevice(p.detach())
    return module
