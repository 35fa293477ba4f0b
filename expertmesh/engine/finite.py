"""NaN and inf, caught where they appear and reported with the step and the layer.

Every layer output a rank computes, and the logits of the sampling rank, leave a 0-dim sum in
fp64 (one op; finite exactly when every element is: a sum of fp32 values cannot overflow fp64),
turned into flags once per step; the flags are read once per step (one host sync, which sampling already
implies; the serving engine reads them in the same copy as the sampled tokens), raising
`NonFiniteError` with the step and the first layer whose output was non-finite.
"""

from __future__ import annotations

import torch

from expertmesh.model.transformer import MoETransformer


class NonFiniteError(RuntimeError):
    """NaN or inf in a layer output or in the logits."""


class FiniteCheck:
    """Flags whether every layer output (`model.after_layer`, until exit) and what `add` is given
    are finite; `check(step)` reads the step's flags at once and raises on the first
    non-finite one."""

    LOGITS = -1

    def __init__(self, model: MoETransformer):
        self.flags: list[torch.Tensor] = []
        self.layers: list[int] = []  # the layer of each flag, LOGITS for the logits
        self.model = model
        model.after_layer.append(self.add)

    def add(self, layer: int, x: torch.Tensor) -> None:
        self.flags.append(x.sum(dtype=torch.float64))
        self.layers.append(layer)

    def take(self, device: torch.device) -> torch.Tensor:
        """The flags added since the last call, `[n]` bool on `device`, for `verify` once read."""
        flags = torch.stack(self.flags).isfinite() if self.flags else torch.ones(0, dtype=torch.bool, device=device)
        self.flags = []
        return flags

    def verify(self, step: int, flags: torch.Tensor) -> None:
        """`take`'s flags, read to the host: raise on the first non-finite one."""
        layers, self.layers = self.layers, []
        bad = {layer for layer, fine in zip(layers, flags.tolist()) if not fine}
        if not bad:
            return
        what = "logits" if self.LOGITS in bad else "hidden states"
        held = [layer for layer in bad if layer != self.LOGITS]
        where = (f"layer {min(held)}" if held else
                 "none of the layers on this rank (an earlier pipeline stage, or the final norm "
                 "and head)")
        raise NonFiniteError(f"non-finite {what} at step {step}; first non-finite layer output: {where}")

    def check(self, step: int) -> None:
        """Read the flags added since the last call (one host sync) and `verify` them."""
        if self.flags:
            self.verify(step, self.take(self.flags[0].device).cpu())

    def __enter__(self) -> "FiniteCheck":
        return self

    def __exit__(self, *exc) -> None:
        if self.add in self.model.after_layer:
            self.model.after_layer.remove(self.add)
