"""The engine's per-step control messages between ranks: Python objects in one collective each.

`torch.distributed`'s object collectives take two collectives per message: `broadcast_object_list`
broadcasts the pickle's size, then the pickle; `all_gather_object` all-gathers every rank's size,
then every pickle padded to the largest. An engine step sends one broadcast (rank 0's requests)
and one all-gather (every rank's sampled tokens), so on 2 idle gloo ranks that is 2.3 ms of
control per step (0.7 + 1.6 ms; 0.3 + 0.75 ms with one fixed-size collective each, measured
ad hoc, medians of 200).

`Messages` keeps one byte buffer per rank of `capacity` bytes and sends each message as a fixed
`[8 + capacity]` uint8 row: the pickle's length (int64), then its first `capacity` bytes. Every
rank reads every length, so all of them know whether some pickle did not fit: then one more
collective carries the rest (`[over]` bytes per rank, `over` the largest remainder).

Every rank then sets `capacity`, identically, to the next power of two that holds the longest
pickle of the last `WINDOW` messages, between the first capacity and `MAX_CAPACITY`: a run of
long messages (a burst of long prompts) takes one collective each, and one long message (a
request with a million stop ids) costs every later step nothing once it leaves the window; a
pickle over `MAX_CAPACITY` always takes the second collective, never a buffer that every idle
step would send.
"""

from __future__ import annotations

import pickle
from collections import deque

import torch
import torch.distributed as dist

from expertmesh.parallel.mesh import all_gather_flat

HEADER = 8  # bytes: the pickle's length, int64
FIRST_CAPACITY = 4096  # bytes of pickle the first message carries in one collective
MAX_CAPACITY = 1 << 18  # bytes: the buffer grows no larger (longer pickles take two collectives)
WINDOW = 64  # messages (an engine step sends two) whose longest pickle sets the capacity


class Messages:
    """Control messages over `group` (a gloo group: the bytes stay on the host). Every rank of
    the group must make the same calls in the same order, as with any collective."""

    def __init__(self, group: dist.ProcessGroup | None = None, capacity: int = FIRST_CAPACITY):
        self.group, self.first, self.capacity = group, capacity, capacity
        self.size = dist.get_world_size(group)
        self.recent: deque[int] = deque(maxlen=WINDOW)  # longest pickle of each of the last messages

    def broadcast(self, obj: object, src: int = 0) -> object:
        """`obj` of rank `src` (its global rank) on every rank; other ranks pass anything."""
        mine = dist.get_rank() == src
        payload = pickle.dumps(obj) if mine else b""
        row = self._row(payload)
        dist.broadcast(row, src, group=self.group)
        length = int(row[:HEADER].view(torch.int64))
        rest = torch.empty(max(0, length - self.capacity), dtype=torch.uint8)
        if rest.numel():
            if mine:
                rest.copy_(_bytes(payload[self.capacity:]))
            dist.broadcast(rest, src, group=self.group)
        self._fit(length)
        return obj if mine else _load(row, length, rest)

    def all_gather(self, obj: object) -> list:
        """Every rank's `obj`, in group rank order, on every rank."""
        payload = pickle.dumps(obj)
        rows = torch.empty(self.size * (HEADER + self.capacity), dtype=torch.uint8)
        all_gather_flat(rows, self._row(payload), group=self.group)  # gloo: a flat output
        rows = rows.view(self.size, -1)
        lengths = rows[:, :HEADER].contiguous().view(torch.int64).view(-1).tolist()
        over = max(lengths) - self.capacity
        rests = [torch.empty(0, dtype=torch.uint8)] * self.size
        if over > 0:
            mine = torch.zeros(over, dtype=torch.uint8)
            tail = payload[self.capacity:]
            if tail:
                mine[:len(tail)] = _bytes(tail)
            gathered = torch.empty(self.size * over, dtype=torch.uint8)
            all_gather_flat(gathered, mine, group=self.group)
            gathered = gathered.view(self.size, over)
            rests = [gathered[r, :max(0, n - self.capacity)] for r, n in enumerate(lengths)]
        loaded = [_load(rows[r], n, rests[r]) for r, n in enumerate(lengths)]
        self._fit(max(lengths))
        return loaded

    def _row(self, payload: bytes) -> torch.Tensor:
        """`[HEADER + capacity]` bytes: the length, then as much of `payload` as fits."""
        row = torch.zeros(HEADER + self.capacity, dtype=torch.uint8)
        row[:HEADER] = torch.tensor([len(payload)], dtype=torch.int64).view(torch.uint8)
        head = payload[:self.capacity]
        if head:
            row[HEADER:HEADER + len(head)] = _bytes(head)
        return row

    def _fit(self, length: int) -> None:
        """After a message whose longest pickle was `length` bytes: the capacity for the next."""
        self.recent.append(length)
        longest, capacity = max(self.recent), self.first
        while capacity < min(longest, MAX_CAPACITY):
            capacity *= 2
        self.capacity = capacity


def _bytes(data: bytes) -> torch.Tensor:
    return torch.frombuffer(bytearray(data), dtype=torch.uint8)


def _load(row: torch.Tensor, length: int, rest: torch.Tensor) -> object:
    """The object whose pickle is `length` bytes: the start in `row` after its header, the rest
    (if any) in `rest`."""
    head = row[HEADER:HEADER + min(length, row.numel() - HEADER)].numpy().tobytes()
    return pickle.loads(head + rest.numpy().tobytes())
