"""An exchange started asynchronously, and the one way the EP exchanges wait for it.

Waiting first yields (`model/steps.py`): another micro-batch's work may run while the exchange is
in flight. The wait shows in a trace as `<name> wait` on the rank's compute track, the exchange
itself as `<name>` on its comm track, from when it was issued to when the wait returned.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch
import torch.distributed as dist

from expertmesh.model.steps import Steps
from expertmesh.trace import COMM, record, span


@dataclass
class InFlight:
    """out: the buffer the exchange fills; work: its handle (None once waited for); name: for
    the trace."""

    out: torch.Tensor
    work: dist.Work | None
    name: str
    started_ns: int = field(default_factory=time.perf_counter_ns)

    def finish(self) -> torch.Tensor:
        """Wait for the exchange (once) and return its buffer."""
        if self.work is not None:
            with span(f"{self.name} wait"):
                self.work.wait()
            record(self.name, self.started_ns, time.perf_counter_ns(), COMM)
            self.work = None
        return self.out

    def wait(self) -> Steps[torch.Tensor]:
        """Yield (other work may run while the exchange is in flight), then `finish`."""
        yield
        return self.finish()
