"""The block tables of a rank's sequences in flight, kept from step to step, on the host and on
the device.

A step's plan (`model/paged.py`'s `PagedBatch`) needs its sequences' block tables as one
`[S, W]` tensor on the device. Rebuilding it from each sequence's Python list every step costs the host
milliseconds at long context (128 sequences x 10k positions are 80k block ids), and so does
copying it up every step. Here each sequence keeps a row of one persistent table `[rows, width]`
(int32, grown by doubling), written only where its block list grew (a decoding sequence gains one
block every block_size steps). The table lives twice: on the host (`table`, what a backend that
plans on the host reads, `StepTables.host`) and on the device (`device`), which follows the host's
by the same writes: a step uploads only its rows `[S]` and the writes since the last step (a few
ids; a whole row when a sequence comes in), with the rest of its plan, and gathers its `[S, W]`
on the device. Nothing a step sends up grows with the context of a decoding sequence.

A run of decode steps over the same sequences within their last blocks (15 steps in 16 with
blocks of 16) changes nothing here: `plan` then hands back the last step's tables, already on the
device, and nothing of the tables goes up.

A sequence whose list the scheduler replaced (`Scheduler._release` gives it a new one when it ends
or is preempted) gives its row back when a row is next needed; if it comes back, it gets a row
written again from the start.
"""

from __future__ import annotations

import torch

from expertmesh.engine.scheduler import Sequence


class BlockTables:
    def __init__(self):
        self.table = torch.zeros(0, 0, dtype=torch.int32)
        self.device: torch.Tensor | None = None  # the device's copy, grown and written in `gather`
        self.rows: dict[Sequence, tuple[int, list[int], int]] = {}  # seq -> (row, its list, ids written)
        self.free: list[int] = []
        self.pending: list[tuple[int, int, list[int]]] = []  # (row, first column, ids) not yet on the device
        self.last: tuple[list[int], StepTables] | None = None  # the last plan's rows, and the plan

    def plan(self, seqs: list[Sequence], needed: list[int]) -> StepTables:
        """The tables of `seqs`, each cut to its `needed` blocks and padded with block ids that are
        valid but never read, as rows of the persistent tables: the host's written where the lists
        grew, the device's to follow in `StepTables.on_device`. The last plan itself when its rows
        and width are these and no block was written since."""
        rows = []
        for seq in seqs:
            entry = self.rows.get(seq)
            if entry is not None and entry[1] is seq.blocks and entry[2] == len(seq.blocks):
                rows.append(entry[0])  # nothing new (a decode within its last block)
                continue
            if entry is not None and entry[1] is not seq.blocks:  # preempted and back: a new list
                del self.rows[seq]
                self.free.append(entry[0])
                entry = None
            row, blocks, written = entry or (self._new_row(), seq.blocks, 0)
            if len(blocks) > written:
                self._fit(0, len(blocks))
                new = blocks[written:]
                self.table[row, written:len(blocks)] = torch.tensor(new, dtype=torch.int32)
                self.pending.append((row, written, new))
            self.rows[seq] = (row, blocks, len(blocks))
            rows.append(row)
        width = max(needed, default=0)
        if not self.pending and self.last is not None and self.last[0] == rows and self.last[1].width == width:
            return self.last[1]
        plan = StepTables(self, torch.tensor(rows, dtype=torch.long), width)
        self.last = rows, plan
        return plan

    def take_writes(self) -> torch.Tensor:
        """The writes the device's table lacks, `[2, K]` int64 (flat index into the host's table
        as it is now, block id), and forget them."""
        width = self.table.shape[1]
        index = [row * width + col + i for row, col, ids in self.pending for i in range(len(ids))]
        ids = [b for _, _, new in self.pending for b in new]
        self.pending = []
        return torch.tensor([index, ids], dtype=torch.long).view(2, -1)

    def on_device(self, writes: torch.Tensor, device: torch.device) -> torch.Tensor:
        """The device's table, grown to the host's shape (a copy on the device, when the host's
        doubled) and given `writes` (`take_writes`', uploaded)."""
        if self.device is None or self.device.shape != self.table.shape:
            grown = torch.zeros(self.table.shape, dtype=torch.int32, device=device)
            if self.device is not None:
                old_rows, old_width = self.device.shape
                grown[:old_rows, :old_width] = self.device
            self.device = grown
        if writes.shape[1]:
            self.device.view(-1).index_copy_(0, writes[0], writes[1].to(torch.int32))
        return self.device

    def _new_row(self) -> int:
        """A free row; when none is, first the rows of sequences released since the last look
        (their list replaced: ended, or preempted), so that a step's work is O(its sequences)."""
        if not self.free:
            for seq, (row, blocks, _) in list(self.rows.items()):
                if seq.blocks is not blocks:
                    del self.rows[seq]
                    self.free.append(row)
        if not self.free:
            self._fit(len(self.rows) + 1, 0)
            used = {row for row, _, _ in self.rows.values()}
            self.free = [r for r in range(self.table.shape[0] - 1, -1, -1) if r not in used]
        return self.free.pop()

    def _fit(self, rows: int, width: int) -> None:
        """Grow the host's table (doubling) to at least `rows` rows and `width` columns; pending
        writes keep (row, column), so they land where they belong in the grown table."""
        old_rows, old_width = self.table.shape
        if rows <= old_rows and width <= old_width:
            return
        grown = torch.zeros(max(rows, 2 * old_rows if rows > old_rows else old_rows),
                            max(width, 2 * old_width if width > old_width else old_width), dtype=torch.int32)
        grown[:old_rows, :old_width] = self.table
        self.table = grown


class StepTables:
    """One step's block tables: `rows [S]` of the persistent tables, cut to `width` blocks; used
    again by the next step when nothing of them changed (`BlockTables.plan`), then `gathered`, its
    device tables, are already there."""

    def __init__(self, tables: BlockTables, rows: torch.Tensor, width: int):
        self.tables, self.rows, self.width = tables, rows, width
        self.gathered: torch.Tensor | None = None

    def host(self) -> torch.Tensor:
        """`[S, width]` int32 on the host."""
        return self.tables.table[self.rows, :self.width]

    def host_arrays(self) -> dict[str, torch.Tensor]:
        """What goes up with the step's plan: its rows and the device table's missing writes;
        nothing when its tables are on the device already."""
        if self.gathered is not None:
            return {}
        return {"table_rows": self.rows, "table_writes": self.tables.take_writes()}

    def on_device(self, up: dict[str, torch.Tensor], device: torch.device) -> torch.Tensor:
        """From `host_arrays`, uploaded: `[S, width]` int32, gathered on the device (once)."""
        if self.gathered is None:
            self.gathered = self.tables.on_device(up["table_writes"], device).index_select(
                0, up["table_rows"])[:, :self.width]
        return self.gathered
