"""Decode steps on persistent buffers, padded to a ladder of batch sizes, replayed from CUDA graphs.

A decode step (every sequence one new token) of a deployment with one pipeline stage, no expert
parallelism and no capacity limit runs on buffers allocated once, for the largest bucket Bmax:

  ids, positions, slots, kv_lens `[Bmax]`, tables `[Bmax, W]` (W: blocks of the longest sequence
  the model allows), views of one flat int64 buffer on the device.

A step uploads, in one non-blocking copy, its ids, positions, slots and kv_lens `[4 Bmax]` and
what the rank's persistent block tables (`engine/block_tables.py`) lack: the step's rows `[S]`
and the block ids written since the last step (a few, or none; neither when the tables are the
last step's, `BlockTables.plan`); on the device the tables' writes
are applied, its rows gathered into the tables buffer, the rest copied into the flat one. Nothing
it sends grows with the context: at Bmax 8 and 4 sequences, 288 bytes, where the whole `[Bmax, W]`
table would be 131 KB at 8k positions in blocks of 4.

S sequences run as the smallest bucket B >= S of the ladder 1, 2, 4, ..., max_seqs. The B - S
padded rows are token 0 at position 0 whose table starts with the pool's scratch block (one block
past those the scheduler hands out): they write their k, v there and read only that (the rest of a
table row is block ids masked past its length), and their logits
are dropped. Through the MoE they route like any token: with local experts and no capacity limit
a row's output depends on no other row, so padding changes no token of a real one. Expert
parallelism stays eager here: its exchange would carry the padded rows and count them in the load
statistics that expert placement reads; so does capacity, under which padded rows would take
places of real ones.

Attention inside is the torch backend's static decode (each row's whole table gathered, masked
past its length), or FlashInfer's CUDA-graph decode wrapper of the bucket, planned on the host
before each forward from the host's block tables.

On CUDA (mode "graphs") every bucket's forward is captured at start, largest first (the attention
gather buffers are then allocated once, at their largest), with every row padded; a step fills
the buffers and replays its bucket's graph. Mode "padded" runs the same buffers and padding
eagerly (the CPU tests: padding changes no token, the forward reads nothing from the host and
allocates by bucket, not by batch); "off" (`--enforce-eager`) uses none of this. Sampling stays
outside the graph: it reads the real rows' logits `[S, V]`.
"""

from __future__ import annotations

import sys

import torch

from expertmesh.engine.block_tables import StepTables
from expertmesh.engine.finite import FiniteCheck
from expertmesh.engine.scheduler import Sequence
from expertmesh.model.attn_backends.torch_paged import TorchBackend
from expertmesh.model.paged import StepShared, upload

MODES = ("auto", "graphs", "padded", "off")


def buckets(max_seqs: int) -> list[int]:
    """1, 2, 4, ... below max_seqs, then max_seqs."""
    out, b = [], 1
    while b < max_seqs:
        out.append(b)
        b *= 2
    return out + [max_seqs]


class DecodeBuffers(StepShared):
    """The plan (`model/paged.py`'s `PagedBatch` interface) of a padded decode forward of B rows, on
    views of the persistent buffers: the same tensors every step."""

    static = True

    def __init__(self, flat: torch.Tensor, rows: int, width: int, B: int, block_size: int,
                 backend: TorchBackend):
        self.ids, self.positions, self.slots, self.kv_lens_device = (
            flat[i * rows:i * rows + B] for i in range(4))
        self.tables = flat[4 * rows:].view(rows, width)[:B]
        self.last = torch.arange(B, device=flat.device)
        self.seq_lens, self.n_tokens = [1] * B, B
        self.block_size, self.device, self.backend = block_size, flat.device, backend
        self.reset()

    def reset(self) -> None:
        """Before an eager forward: the per-step state is computed again from the buffers."""
        self.meta = {"pieces": None, "prefill": None, "masks": {}}
        self._rope: dict = {}


class DecodeGraphs:
    """`mode`: "graphs" (capture on CUDA) or "padded" (the same, eager). `scratch`: the pool block
    padded rows use; `max_len`: the longest sequence (sets W); `backend`: the rank's attention
    backend (torch or FlashInfer)."""

    def __init__(self, model, pools: dict, finite: FiniteCheck, block_size: int, max_seqs: int,
                 max_len: int, scratch: int, mode: str, backend):
        self.model, self.pools, self.finite, self.mode = model, pools, finite, mode
        self.block_size, self.scratch = block_size, scratch
        self.sizes = buckets(max_seqs)
        self.rows, self.width = self.sizes[-1], -(-max_len // block_size)
        device = next(iter(pools.values())).k.device
        self.host = torch.zeros(4, self.rows, dtype=torch.long)  # ids, positions, slots, kv_lens
        self.flat = torch.zeros(4 * self.rows + self.rows * self.width, dtype=torch.long, device=device)
        self.table = self.flat[4 * self.rows:].view(self.rows, self.width)
        # the torch backend's static plan gathers into its own buffers; FlashInfer's plans each size
        self.backend = backend if backend.name == "flashinfer" else TorchBackend()
        for B in self.sizes if backend.name == "flashinfer" else ():
            backend.add_graph_size(B, self.width)
        self.plans = {B: DecodeBuffers(self.flat, self.rows, self.width, B, block_size, self.backend)
                      for B in self.sizes}
        self.graphs: dict[int, tuple[torch.cuda.CUDAGraph, torch.Tensor, list, list]] = {}
        self._start(capture=mode == "graphs")

    def takes(self, chosen) -> bool:
        """Whether this forward runs here: every sequence decodes, and they fit the largest bucket."""
        return 0 < len(chosen) <= self.rows and all(n == 1 for _, n in chosen)

    def forward(self, seqs: list[Sequence], tables: StepTables) -> torch.Tensor:
        """The decode forward of S sequences, each bringing its token at position `computed`, whose
        block `tables` (the rank's persistent ones, cut to the blocks they need) -> logits `[S, V]`."""
        S = len(seqs)
        B = next(b for b in self.sizes if b >= S)
        self._fill(S, seqs)
        arrays = tables.host_arrays()  # none when the last step's tables are this one's
        up = upload([self.host, *arrays.values()], self.flat.device)  # one copy, waits for nothing
        on_device = tables.on_device(dict(zip(arrays, up[1:])), self.flat.device)
        self.flat[:4 * self.rows].copy_(up[0].view(-1))
        self.table[:S, :on_device.shape[1]] = on_device
        self.table[S:, 0] = self.scratch
        self._plan(B, tables)
        if B in self.graphs:
            graph, logits, flags, layers = self.graphs[B]
            graph.replay()
            self.finite.flags += flags
            self.finite.layers += layers
            return logits[:S]
        return self._forward(B)[:S]

    def _fill(self, S: int, seqs: list[Sequence]) -> None:
        """The host's ids, positions, slots, kv_lens `[4, Bmax]`: real rows 0 .. S-1 from `seqs`
        (slot: the block of position `computed` in the sequence's list), the rest padding (token 0
        at position 0 in the scratch block)."""
        s = self.block_size
        self.host[:, :S] = torch.tensor(
            [[seq.tokens[seq.computed] for seq in seqs], [seq.computed for seq in seqs],
             [seq.blocks[seq.computed // s] * s + seq.computed % s for seq in seqs],
             [seq.computed + 1 for seq in seqs]], dtype=torch.long).view(4, S)
        self.host[:, S:] = torch.tensor([[0], [0], [self.scratch * s], [1]])

    def _plan(self, B: int, tables: StepTables | None) -> None:
        """FlashInfer's page table of the first B rows: the host's `tables` of the real ones
        (none: every row padded), the rest the scratch block (the torch backend plans on the
        device, inside the forward)."""
        if self.backend.name != "flashinfer":
            return
        real = tables.host().long() if tables is not None else torch.zeros(0, 1, dtype=torch.long)
        padding = torch.full((B - real.shape[0], real.shape[1]), self.scratch)
        self.backend.plan_graph(torch.cat([real, padding]), self.host[3, :B], self.block_size)

    def _forward(self, B: int) -> torch.Tensor:
        plan = self.plans[B]
        plan.reset()
        return self.model.forward_paged(plan.ids, self.pools, plan)

    def _start(self, capture: bool) -> None:
        """Run the largest bucket once with every row padded (the gather buffers are allocated
        then, at their largest, never inside a forward or a graph), then capture every bucket's
        forward, largest first, when `capture`."""
        self._fill(0, [])
        self.flat[:4 * self.rows].copy_(self.host.view(-1))
        self.table.fill_(self.scratch)
        before = len(self.finite.flags)
        self._plan(self.rows, None)
        if capture:
            side = torch.cuda.Stream()  # warm up off the capture stream, as capture requires
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                self._forward(self.rows)
            torch.cuda.current_stream().wait_stream(side)
        else:
            self._forward(self.rows)
        del self.finite.flags[before:], self.finite.layers[before:]
        if not capture:
            return
        memory = torch.cuda.graph_pool_handle()
        try:
            for B in reversed(self.sizes):
                self._plan(B, None)
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph, pool=memory):
                    logits = self._forward(B)
                flags, layers = self.finite.flags[before:], self.finite.layers[before:]
                del self.finite.flags[before:], self.finite.layers[before:]
                self.graphs[B] = (graph, logits, flags, layers)
        except RuntimeError as e:  # an op that reads the host (the per-expert loop outside bf16 on Hopper)
            del self.finite.flags[before:], self.finite.layers[before:]
            self.graphs, self.mode = {}, "padded"
            print(f"warning: decode graph capture failed ({str(e).splitlines()[0]}); decodes run eagerly",
                  file=sys.stderr)
