"""The low-latency expert-parallel exchange for small batches (decode): one collective per
direction and no host sync, in the manner of DeepEP's low-latency mode.

Notation as in `dispatch.py`: T tokens on this rank, k experts per token, D d_model, P ranks,
El_p expert slots on rank p (El here, El_max the largest). M bounds every rank's T for this call
(the caller agrees on it once per engine step, not per layer), so every message has a fixed size:

  cap = M * min(k, El_max)   rows one rank can send one peer (a token's k experts are distinct)

  1. sort assignments by slot; each lands at (destination p, position in p's block) of a send
     buffer `[P, cap, D]`, grouped by the destination's local expert, in the order of the
     standard path; the rows per local expert `[P, El_max]` int32 ride in front of each block;
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

from expertmesh.model.moe import GroupedExperts, rank_in_group
from expertmesh.model.steps import Steps
from expertmesh.parallel.in_flight import InFlight
from expertmesh.trace import span


class LowLatencyExchange:
    """The fixed-size exchange of one EP layer for one rank (`rank` of `slots_per_rank`)."""

    def __init__(self, group: dist.ProcessGroup | None, slots_per_rank: list[int], rank: int,
                 peer_nodes: list[int]):
        self.group, self.rank, self.slots_per_rank = group, rank, slots_per_rank
        self.n_ranks, self.max_slots = len(slots_per_rank), max(slots_per_rank)
        self.remote_peers = sum(node != peer_nodes[rank] for node in peer_nodes)
        n_slots = sum(slots_per_rank)
        owner = torch.repeat_interleave(torch.arange(self.n_ranks), torch.tensor(slots_per_rank))
        first = torch.tensor([0, *slots_per_rank]).cumsum(0)[:-1]
        # per slot, and one more for "skipped" (sent nowhere): destination rank, local index
        self._dest = torch.cat([owner, torch.tensor([self.n_ranks])])
        self._local = torch.cat([torch.arange(n_slots) - first[owner], torch.tensor([0])])

    def _on(self, device: torch.device) -> None:
        if self._dest.device != device:  # once: a copy per call would wait for the device
            self._dest, self._local = self._dest.to(device), self._local.to(device)

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
        flat = slots.reshape(-1)
        dest, local = self._dest[flat], self._local[flat]  # [T * k]
        where = self._positions(flat, dest, cap)  # row of each assignment in the send buffer

        with span("low-latency pack"):
            rows = x.new_empty(self.n_ranks * cap + 1, D)  # + 1: where skipped assignments land
            rows[where] = x.repeat_interleave(k, dim=0)
            header = torch.zeros(self.n_ranks + 1, self.max_slots, dtype=torch.int32, device=device)
            header.index_put_((dest, local), torch.ones_like(dest, dtype=torch.int32), accumulate=True)
            message = _pack(header[:self.n_ranks], rows[:-1].view(self.n_ranks, cap, D))
        received = torch.empty_like(message)
        yield from self._exchange(received, message, "low-latency dispatch")
        counts, recv_rows = _unpack(received, self.max_slots, cap, x.dtype, D)
        El = self.slots_per_rank[self.rank]
        results = self._compute(recv_rows.reshape(-1, D), counts[:, :El], cap, experts)
        back = torch.empty_like(results)
        yield from self._exchange(back, results, "low-latency combine exchange")
        row_bytes = D * x.element_size()
        stats.low_latency_calls += 1
        stats.rows_sent += 2 * self.n_ranks * cap  # what crosses the network, padding included
        stats.cross_node_rows += 2 * cap * self.remote_peers
        stats.cross_node_bytes += 2 * cap * self.remote_peers * row_bytes
        stats.loads.append(counts[:, :El].sum(0))  # read on the host after the run
        with span("combine"):
            padded = torch.cat([back, back.new_zeros(1, D)])  # skipped assignments read zeros
            return (padded[where].view(T, k, D) * weights.unsqueeze(-1)).sum(dim=1)

    def _exchange(self, out: torch.Tensor, message: torch.Tensor, name: str) -> Steps[torch.Tensor]:
        """The equal-split all_to_all_single of `message` into `out`: start it, yield while it is
        in flight, wait."""
        work = dist.all_to_all_single(out, message, group=self.group, async_op=True)
        return (yield from InFlight(out, work, name).wait())

    def _positions(self, flat: torch.Tensor, dest: torch.Tensor, cap: int) -> torch.Tensor:
        """Send-buffer row of each assignment `[T * k]`: block of its destination, rank among the
        assignments to it in slot order (stable); skipped ones -> the spare row P * cap."""
        order = torch.argsort(flat, stable=True)  # slots are numbered rank by rank: dests stay together
        per_dest = torch.zeros(self.n_ranks + 1, dtype=torch.long, device=flat.device)
        per_dest.index_add_(0, dest, torch.ones_like(dest))
        rank_in_dest = rank_in_group(order, dest, per_dest)
        return torch.where(dest < self.n_ranks, dest * cap + rank_in_dest, self.n_ranks * cap)

    def _compute(self, rows: torch.Tensor, counts: torch.Tensor, cap: int,
                 experts: GroupedExperts) -> torch.Tensor:
        """rows `[P * cap, D]` (peer blocks, valid rows first, grouped by local expert), counts
        `[P, El]` -> outputs `[P * cap, D]` in place of each valid row (padding rows: undefined)."""
        P, El = counts.shape
        with span("expert compute"):
            bounds = counts.cumsum(1)  # [P, El]: end of each local expert's rows in a block
            position = torch.arange(cap, device=rows.device).expand(P, cap).contiguous()
            expert_of_row = torch.searchsorted(bounds, position, right=True)  # El: padding
            regroup = torch.argsort(expert_of_row.reshape(-1), stable=True)
            per_expert = counts.sum(0)
            computed = experts(rows[regroup], per_expert)
            results = torch.empty_like(computed)
            results[regroup] = computed
        return results


def _pack(header: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """header `[P, El_max]` int32, rows `[P, cap, D]` -> one byte message `[P, bytes]`."""
    P = header.shape[0]
    return torch.cat([header.view(torch.uint8).reshape(P, -1), rows.view(torch.uint8).reshape(P, -1)], dim=1)


def _unpack(message: torch.Tensor, max_slots: int, cap: int, dtype: torch.dtype,
            d_model: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The inverse of `_pack`: counts `[P, El_max]` (int64), rows `[P, cap, D]`."""
    P, head = message.shape[0], max_slots * 4
    counts = message[:, :head].contiguous().view(torch.int32).view(P, max_slots).long()
    rows = message[:, head:].contiguous().view(dtype).view(P, cap, d_model)
    return counts, rows
