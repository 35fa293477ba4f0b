"""A rank's pipeline neighbours, as the engine's forward sees them.

Under pipeline parallelism a stage receives hidden states from the previous stage and sends its
own to the next one; `parallel/pipeline.py`'s `PipelineLinks` implements `StageLinks` over
point-to-point messages. (The serving engine shares the last stage's sampled tokens with every rank
through the step's all-gather, `engine/engine.py`; only the static `generate` loop sends them back
to the first stage over these links.)
Without pipeline parallelism a rank is a `SingleStage`: first and last, with no neighbours.
"""

from __future__ import annotations

from typing import Protocol

import torch


class StageLinks(Protocol):
    """Pipeline neighbours of a stage (implemented in `parallel/pipeline.py`)."""

    is_first: bool
    is_last: bool

    def send_hidden(self, micro: int, h: torch.Tensor) -> None: ...
    def recv_hidden(self, micro: int, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor: ...
    def send_tokens(self, micro: int, tokens: torch.Tensor) -> None: ...
    def recv_tokens(self, micro: int, n: int) -> torch.Tensor: ...
    def finish(self) -> None: ...


class SingleStage:
    """The whole model on this rank: no neighbours."""

    is_first = True
    is_last = True

    def finish(self) -> None:
        pass
