"""NaN and inf, caught where they appear and reported with the step and the layer.

Every layer output a rank computes, and the logits of the sampling rank, leave a 0-dim
`isfinite(x).all()` flag; the flags are read once per step (one host sync, which sampling already
implies), raising `NonFiniteError` with the step and the first layer whose output was non-finite.
"""

from __future__ import annotations

import torch

from expertmesh.model.transformer import MoETransformer


class NonFiniteError(RuntimeError):
    """NaN or inf in a layer output or in the logits."""


class FiniteCheck:
    """Flags `isfinite(x).all()` of every layer output (`model.after_layer`, until exit) and of
    what `add` is given; `check(step)` reads the step's flags at once and raises on the first
    non-finite one."""

    LOGITS = -1

    def __init__(self, model: MoETransformer):
        self.flags: list[torch.Tensor] = []
        self.layers: list[int] = []  # the layer of each flag, LOGITS for the logits
        self.model = model
        model.after_layer.append(self.add)

    def add(self, layer: int, x: torch.Tensor) -> None:
        self.flags.append(torch.isfinite(x).all())
        self.layers.append(layer)

    def check(self, step: int) -> None:
        if not self.flags:
            return
        ok = torch.stack(self.flags).cpu()
        bad = {layer for layer, fine in zip(self.layers, ok.tolist()) if not fine}
        self.flags, self.layers = [], []
        if not bad:
            return
        what = "logits" if self.LOGITS in bad else "hidden states"
        held = [layer for layer in bad if layer != self.LOGITS]
        where = (f"layer {min(held)}" if held else
                 "none of the layers on this rank (an earlier pipeline stage, or the final norm "
                 "and head)")
        raise NonFiniteError(f"non-finite {what} at step {step}; first non-finite layer output: {where}")

    def __enter__(self) -> "FiniteCheck":
        return self

    def __exit__(self, *exc) -> None:
        if self.add in self.model.after_layer:
            self.model.after_layer.remove(self.add)
