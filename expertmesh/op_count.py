"""Counting what a forward launches: aten ops per decoder layer, as a `TorchDispatchMode`.

Counted: every aten op that reaches the dispatcher, except views (they launch nothing), bare
allocations (`empty*`), `detach_` (a metadata change) and scalar reads (`item`, `_local_scalar_dense`; a read is counted apart,
`tests/fake_device.py`). On a GPU without graphs each counted op is about one kernel launch.
Collectives (the `c10d` namespace) are counted apart, in `collectives`.

`per_layer` attributes ops to the decoder layer that ran them (the layer's own work and the
model's per-layer checks, `MoETransformer._layer_steps`), so that the count does not depend on
the embedding, the head or sampling.
"""

from __future__ import annotations

from collections import Counter
from contextlib import contextmanager

import torch
from torch.utils._python_dispatch import TorchDispatchMode

# allocations, scalar reads, and `detach_` (autograd metadata of a tensor: no kernel, no data)
_NOT_COUNTED = {"empty", "empty_like", "empty_strided", "new_empty", "new_empty_strided", "item",
                "_local_scalar_dense", "detach_"}


def counted(func) -> bool:
    """Whether `func` (an op overload) launches work: an aten op, not a view, allocation or read."""
    schema = func._schema
    if func.namespace != "aten" or func.is_view or func.__name__.split(".")[0] in _NOT_COUNTED:
        return False
    return not (schema.returns and all(r.alias_info is not None and not r.alias_info.is_write
                                       for r in schema.returns))


class OpCounter(TorchDispatchMode):
    """`ops`: counted ops so far, `by_name`: the same by op name, `collectives`: c10d ops."""

    def __init__(self):
        super().__init__()
        self.ops, self.collectives = 0, 0
        self.by_name: Counter[str] = Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if counted(func):
            self.ops += 1
            self.by_name[func.__name__] += 1
        elif func.namespace == "c10d":
            self.collectives += 1
        return func(*args, **(kwargs or {}))


@contextmanager
def per_layer(model, counter: OpCounter):
    """While active, `layer_ops` (yielded) gets the ops each decoder layer of `model` (a
    `MoETransformer`) ran, one entry per layer call, in call order. Layers must not interleave
    (no two-batch overlap)."""
    layer_ops: list[int] = []
    inner = model._layer_steps

    def counted_steps(name, h, kv):
        start = counter.ops
        out = yield from inner(name, h, kv)
        layer_ops.append(counter.ops - start)
        return out

    model._layer_steps = counted_steps
    try:
        yield layer_ops
    finally:
        del model._layer_steps
