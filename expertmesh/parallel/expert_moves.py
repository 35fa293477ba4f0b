"""Online EPLB's weight moves: one MoE layer's new replicas copied into their slots while steps go
on with the old placement, then the layer's slot table switched.

A `LayerMove` of a layer to a new placement (same slot count per rank) is made identically on
every rank of the layer's EP group, then:

  post():    for every slot whose expert changes, the new expert's weights `[H, D]`, `[D, H]`
             (and `[H, D]`) go point to point (async isend / irecv over the move group, a group
             of its own so that the copies overlap the step's exchange) from a holder of that
             expert in the old placement (the receiving rank itself when it holds it, else the
             lowest such rank) into a staging buffer of the receiver; the layer's slots and
             slot table are untouched, so the step that follows computes with the old placement.
  finish():  at the next step boundary: wait for this rank's copies (sends and receives), copy
             the staged weights into their slots (in place: a captured graph keeps its pointers)
             and switch the dispatcher's slot table (`AllToAllDispatcher.switch`).

Every rank of the group posts and finishes the same moves at the same steps (the controller,
`eplb.py`, decides them from data every rank has), so every slot table switches at one step
boundary; and a rank's slots take their new experts' weights before its table changes, so no
table ever names a slot whose weights are not in place. What crosses the network: per changed
slot, one expert's weights (2 or 3 matrices of H x D in the model's dtype), once.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from expertmesh.model.moe import MoEBlock
from expertmesh.trace import span


def copy_plan(old: list[list[int]], new: list[list[int]], me: int) -> tuple[list, list, list]:
    """What rank `me` copies to take one layer from placement `old` to `new` (rank r's experts, by
    slot): (local: (my slot, my old slot of its expert), recvs: (my slot, the peer it comes from),
    sends: (peer, my old slot of the expert it receives)), for every slot whose expert changes.
    An expert comes from its receiver when that rank already holds it, else from its lowest old
    holder. Ranks may hold other slot counts in `new` than in `old`."""
    local, recvs, sends = [], [], []
    for r, experts in enumerate(new):
        for s, e in enumerate(experts):
            if s < len(old[r]) and old[r][s] == e:
                continue
            source = r if e in old[r] else min(p for p in range(len(old)) if e in old[p])
            if r == me and source == r:
                local.append((s, old[r].index(e)))
            elif r == me:
                recvs.append((s, source))
            elif source == me:
                sends.append((r, old[me].index(e)))
    return local, recvs, sends


class LayerMove:
    """One layer's move on this rank. block: the layer's MoE block (its `experts` and all-to-all
    `dispatcher`); new[r]: rank r's experts after the move; group: the EP group's move group."""

    def __init__(self, layer: int, block: MoEBlock, new: list[list[int]], group: dist.ProcessGroup):
        self.layer, self.block, self.new, self.group = layer, block, new, group
        old = block.dispatcher.placement
        self.me = block.dispatcher.rank
        self.changes = [(s, e) for s, (was, e) in enumerate(zip(old[self.me], new[self.me])) if was != e]
        self.local, self.recvs, self.sends = copy_plan(old, new, self.me)
        self.staged: dict[int, dict[str, torch.Tensor]] = {}
        self.works: list = []
        self.bytes_received = 0

    def post(self) -> None:
        """Start this rank's copies (see the module docstring); nothing it computes with changes."""
        params = dict(self.block.experts.named_parameters())
        ops = []
        for slot, old_slot in self.local:
            self.staged[slot] = {n: p[old_slot].clone() for n, p in params.items()}
        for slot, peer in self.recvs:
            self.staged[slot] = {n: torch.empty_like(p[slot]) for n, p in params.items()}
            for n in sorted(params):
                ops.append(dist.P2POp(dist.irecv, self.staged[slot][n], dist.get_global_rank(self.group, peer),
                                      self.group))
                self.bytes_received += self.staged[slot][n].nbytes
        for peer, old_slot in self.sends:
            for n in sorted(params):
                ops.append(dist.P2POp(dist.isend, params[n][old_slot], dist.get_global_rank(self.group, peer),
                                      self.group))
        with span(f"eplb post layer {self.layer}"):
            self.works = dist.batch_isend_irecv(ops) if ops else []

    def finish(self) -> None:
        """Wait for this rank's copies, put the staged weights in their slots, switch the table."""
        with span(f"eplb switch layer {self.layer}"):
            for work in self.works:
                work.wait()
            params = dict(self.block.experts.named_parameters())
            for slot, tensors in self.staged.items():
                for n, t in tensors.items():
                    params[n].data[slot].copy_(t)
            self.block.dispatcher.switch(self.new)
        self.works, self.staged = [], {}
