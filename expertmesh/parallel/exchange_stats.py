"""What one rank's expert-parallel exchange of one MoE layer moved: the counters the dispatchers
(`dispatch.py`, `low_latency.py`) add to on every call, and `engine/counters.py` resets and reads.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

import torch


# Layer calls whose loads are kept, the most recent: bounded memory for a program that steps an
# `Engine` for hours without reading its counters (the server reads and resets them every 16 steps).
MAX_LOADS = 1 << 16


@dataclass
class ExchangeStats:
    """Rows this rank sent, over all calls: all of them, and those to another node; and the
    rows its experts computed in each of the last `MAX_LOADS` calls (its load)."""

    rows_sent: int = 0
    low_latency_calls: int = 0  # calls that took the low-latency exchange
    cross_node_rows: int = 0
    cross_node_bytes: int = 0
    # per call: rows per local slot; the low-latency exchange keeps them on the device (no host
    # sync); a snapshot's are a list of host lists
    loads: deque | list = field(default_factory=lambda: deque(maxlen=MAX_LOADS))
    # online EPLB's load window (`eplb.py` sets, zeroes and reads it; `reset` leaves it): rows per
    # expert `[E]` computed here, on the device, and the expert of each local slot `[El]`
    window: torch.Tensor | None = None
    window_experts: torch.Tensor | None = None

    def add(self, splits: list[int], peer_nodes: list[int], my_node: int, row_bytes: int) -> None:
        cross = sum(n for n, node in zip(splits, peer_nodes) if node != my_node)
        self.rows_sent += sum(splits)
        self.cross_node_rows += cross
        self.cross_node_bytes += cross * row_bytes

    def count_window(self, rows_per_slot) -> None:
        """Add one call's rows per local slot `[El]` (a zero-argument function giving them on the
        device, called only while a window is open) to the window: device ops, no host read."""
        if self.window is not None:
            self.window.index_add_(0, self.window_experts, rows_per_slot())

    def reset(self) -> None:
        """Zero every counter, in place (the dispatcher keeps this object)."""
        self.rows_sent = self.low_latency_calls = self.cross_node_rows = self.cross_node_bytes = 0
        self.loads.clear()

    def snapshot(self) -> "ExchangeStats":
        """A copy with every load on the host as a list of ints: device loads are read here, once
        (a host sync), after the calls it counts."""
        loads = [x.tolist() if isinstance(x, torch.Tensor) else list(x) for x in self.loads]
        return ExchangeStats(self.rows_sent, self.low_latency_calls, self.cross_node_rows,
                             self.cross_node_bytes, loads)
