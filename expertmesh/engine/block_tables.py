"""The block tables of a rank's sequences in flight, kept from step to step.

A step's plan (`model/paged.py`'s `PagedBatch`) needs its sequences' block tables as one
`[S, W]` tensor. Rebuilding it from each sequence's Python list every step costs the host
milliseconds at long context (128 sequences x 10k positions are 80k block ids); here each
sequence keeps a row of one persistent host table `[rows, width]` (int32, grown by doubling),
written only where its block list grew (a decoding sequence gains one block every block_size
steps), and a step's tables are one gather of its sequences' rows. A sequence whose list the
scheduler replaced (`Scheduler._release` gives it a new one when it ends or is preempted) gives
its row back; if it comes back, its row is written again from the start.
"""

from __future__ import annotations

import torch

from expertmesh.engine.scheduler import Sequence


class BlockTables:
    def __init__(self):
        self.table = torch.zeros(0, 0, dtype=torch.int32)
        self.rows: dict[Sequence, tuple[int, list[int], int]] = {}  # seq -> (row, its list, ids written)
        self.free: list[int] = []

    def step(self, seqs: list[Sequence], needed: list[int]) -> torch.Tensor:
        """The tables of `seqs`, each cut to its `needed` blocks and padded with block ids that
        are valid but never read: `[len(seqs), max(needed)]` int32."""
        for seq, (row, blocks, _) in list(self.rows.items()):
            if seq.blocks is not blocks:  # released: ended, or preempted (then recomputed)
                del self.rows[seq]
                self.free.append(row)
        rows = []
        for seq in seqs:
            row, blocks, written = self.rows.get(seq) or (self._new_row(), seq.blocks, 0)
            if len(blocks) > written:
                self._fit(0, len(blocks))
                self.table[row, written:len(blocks)] = torch.tensor(blocks[written:], dtype=torch.int32)
            self.rows[seq] = (row, blocks, len(blocks))
            rows.append(row)
        width = max(needed, default=0)
        return self.table[torch.tensor(rows, dtype=torch.long), :width]

    def _new_row(self) -> int:
        if not self.free:
            self._fit(len(self.rows) + 1, 0)
            used = {row for row, _, _ in self.rows.values()}
            self.free = [r for r in range(self.table.shape[0] - 1, -1, -1) if r not in used]
        return self.free.pop()

    def _fit(self, rows: int, width: int) -> None:
        """Grow the table (doubling) to at least `rows` rows and `width` columns."""
        old_rows, old_width = self.table.shape
        if rows <= old_rows and width <= old_width:
            return
        grown = torch.zeros(max(rows, 2 * old_rows if rows > old_rows else old_rows),
                            max(width, 2 * old_width if width > old_width else old_width), dtype=torch.int32)
        grown[:old_rows, :old_width] = self.table
        self.table = grown
