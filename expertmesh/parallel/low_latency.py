"""The low-latency expert-parallel exchange for small batches (decode): one collective per
direction and no host sync, in the manner of DeepEP's low-latency mode.

Notation as in `dispatch.py`: T tokens on this rank, k experts per token, D d_model, P ranks,
El_p expert slots on rank p (El here, El_max the largest). M bounds every rank's T for this call
(the caller agrees on it once per engine step, not per layer), so every message has a fixed size:

  cap = M * min(k, El_max)   rows one rank can send one peer (a token's k experts are distinct)

  1. sort assignments by slot; each lands at (destination p, position in p's block) of a send
     buffer `[P, cap, D]`, grouped by the destination's local expert, in the order of the
     standard path; the rows per local expert `[P, El_max]` int64 ride in front of each block;
  2. all_to_all_single of `[P, header + cap * D]` bytes, equal splits: the receiver reads its
     counts from the buffer, on the device;
  3. valid rows grouped by local expert (padding rows last), grouped expert compute, outputs put
     back in place;
  4. all_to_all_single of the results `[P, cap, D]` back;
  5. each assignment reads its row at (p, position) (a zero row when skipped) and the k rows of a
     token are summed with their router weights, as `model/moe.combine` does.

The experts see the same rows in the same order as on the standard path, so the outputs are
bitwise equal to it. What crosses the network is fixed: 2 * P * cap rows per layer, padding
included (counted as sent in `ExchangeStats`).
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from expertmesh.model.moe import GroupedExperts, weighted_sum
from expertmesh.model.steps import Steps
from expertmesh.parallel.in_flight import InFlight
from expertmesh.trace import span


class LowLatencyExchange:
    """The fixed-size exchange of one EP layer for one rank (`rank` of `slots_per_rank`)."""

    def __init__(self, group: dist.ProcessGroup | None, slots_per_rank: list[int], rank: int,
                 peer_nodes: list[int], may_skip: bool = True):
        """`may_skip`: some assignment may be sent nowhere (capacity drops); else none is."""
        self.group, self.rank, self.slots_per_rank = group, rank, slots_per_rank
        self.may_skip = may_skip
        self.n_ranks, self.max_slots = len(slots_per_rank), max(slots_per_rank)
        self.remote_peers = sum(node != peer_nodes[rank] for node in peer_nodes)
        n_slots = sum(slots_per_rank)
        owner = torch.repeat_interleave(torch.arange(self.n_ranks), torch.tensor(slots_per_rank))
        first = [sum(slots_per_rank[:p]) for p in range(self.n_ranks)]
        # per slot, and one more for "skipped" (sent nowhere): the destination rank
        self._dest = torch.cat([owner, torch.tensor([self.n_ranks])])
        # `[P + 1, El_max + 1]`: the first slot of each (rank, local expert), each rank's last one
        # repeated past its slots (so they count no rows), then a row for "skipped"
        self._bounds = torch.tensor([[first[p] + min(e, n) for e in range(self.max_slots + 1)]
                                     for p, n in enumerate(slots_per_rank)] + [[n_slots] * (self.max_slots + 1)])
        self._positions_made = torch.empty(0, 0, dtype=torch.long)

    def _on(self, device: torch.device) -> None:
        if self._dest.device != device:  # once: a copy per call would wait for the device
            self._dest, self._bounds = self._dest.to(device), self._bounds.to(device)

    def steps(self, x: torch.Tensor, slots: torch.Tensor, weights: torch.Tensor,
              experts: GroupedExperts, max_tokens: int, stats) -> Steps[torch.Tensor]:
        """x `[T, D]`, slots `[T, k]` (n_slots: skipped), weights `[T, k]` -> `[T, D]`; T <= max_tokens
        on every rank of the group. A generator (`model/steps.py`) that yields once per direction,
        while the exchange is in flight."""
        T, k = slots.shape
        D, device = x.shape[1], x.device
        self._on(device)
        if T > max_tokens:
            raise ValueError(f"low-latency exchange of {T} tokens over a bound of {max_tokens}")
        cap = max(1, max_tokens * min(k, self.max_slots))
        P = self.n_ranks
        where, header = self._positions(slots.reshape(-1), cap)

        with span("low-latency pack"):
            rows = x.new_empty(P * cap + T * k, D)  # skipped assignments land past P * cap
            rows[where.view(T, k)] = x.unsqueeze(1)
            message = _pack(header, rows[:P * cap].view(P, cap, D))
        received = torch.empty_like(message)
        yield from self._exchange(received, message, "low-latency dispatch")
        counts, recv_rows = _unpack(received, self.max_slots, cap, x.dtype, D)
        El = self.slots_per_rank[self.rank]
        per_expert = counts[:, :El].sum(0)
        results = self._compute(recv_rows.reshape(-1, D), counts[:, :El], per_expert, cap, experts)
        back = results.new_empty(P * cap + T * k, D)
        if self.may_skip:
            back[P * cap:].zero_()  # skipped assignments read zeros
        yield from self._exchange(back[:P * cap], results, "low-latency combine exchange")
        row_bytes = D * x.element_size()
        stats.low_latency_calls += 1
        stats.rows_sent += 2 * self.n_ranks * cap  # what crosses the network, padding included
        stats.cross_node_rows += 2 * cap * self.remote_peers
        stats.cross_node_bytes += 2 * cap * self.remote_peers * row_bytes
        stats.loads.append(per_expert)  # read on the host after the run
        stats.count_window(lambda: per_expert)
        with span("combine"):
            return weighted_sum(back[where].view(T, k, D), weights)

    def _exchange(self, out: torch.Tensor, message: torch.Tensor, name: str) -> Steps[torch.Tensor]:
        """The equal-split all_to_all_single of `message` into `out`: start it, yield while it is
        in flight, wait."""
        work = dist.all_to_all_single(out, message, group=self.group, async_op=True)
        return (yield from InFlight(out, work, name).wait())

    def _positions(self, flat: torch.Tensor, cap: int) -> tuple[torch.Tensor, torch.Tensor]:
        """slots `[T * k]` -> (send-buffer row of each assignment `[T * k]`: block of its
        destination, rank among the assignments to it in slot order (stable); skipped ones past
        every block, from P * cap; the header: rows per (destination, local expert) `[P, El_max]`).

        Slots are numbered rank by rank, so sorted slots keep each destination's together: an
        assignment's rank in its destination is its place in the sorted order less the number of
        assignments to earlier destinations, which one `searchsorted` of the slot boundaries
        counts, with the header's counts."""
        P, dest = self.n_ranks, self._dest[flat]
        ordered, order = torch.sort(flat, stable=True)
        place = torch.argsort(order)  # the inverse permutation
        before = torch.searchsorted(ordered, self._bounds)  # [P + 1, El_max + 1]
        header = before[:P, 1:] - before[:P, :-1]
        return torch.add(place - before[:, 0][dest], dest, alpha=cap), header

    def _position_table(self, P: int, cap: int, device: torch.device) -> torch.Tensor:
        """`[P, cap]` int64: each row's position in its peer's block, made once per (cap, device)."""
        if self._positions_made.shape != (P, cap) or self._positions_made.device != device:
            self._positions_made = torch.arange(cap, device=device).expand(P, cap).contiguous()
        return self._positions_made

    def _compute(self, rows: torch.Tensor, counts: torch.Tensor, per_expert: torch.Tensor, cap: int,
                 experts: GroupedExperts) -> torch.Tensor:
        """rows `[P * cap, D]` (peer blocks, valid rows first, grouped by local expert), counts
        `[P, El]` and their sum `[El]` -> outputs `[P * cap, D]` in place of each valid row
        (padding rows: undefined)."""
        P, El = counts.shape
        with span("expert compute"):
            bounds = counts.cumsum(1)  # [P, El]: end of each local expert's rows in a block
            position = self._position_table(P, cap, rows.device)
            expert_of_row = torch.searchsorted(bounds, position, right=True)  # El: padding
            regroup = torch.argsort(expert_of_row.reshape(-1), stable=True)
            computed = experts(rows[regroup], per_expert)
            results = torch.empty_like(computed)
            results[regroup] = computed
        return results


def _pack(header: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """header `[P, El_max]` int64, rows `[P, cap, D]` -> one byte message `[P, bytes]`."""
    P = header.shape[0]
    return torch.cat([header.view(torch.uint8).reshape(P, -1), rows.view(torch.uint8).reshape(P, -1)], dim=1)


def _unpack(message: torch.Tensor, max_slots: int, cap: int, dtype: torch.dtype,
            d_model: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The inverse of `_pack`: counts `[P, El_max]` (int64), rows `[P, cap, D]`."""
    P, head = message.shape[0], max_slots * 8
    counts = message[:, :head]
    if counts.stride(0) % 8:  # rows of a length that int64 cannot view in place
        counts = counts.contiguous()
    counts = counts.view(torch.int64).view(P, max_slots)
    rows = message[:, head:].contiguous().view(dtype).view(P, cap, d_model)
    return counts, rows
