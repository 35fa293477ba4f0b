"""Expert-parallel token exchange: send each (token, expert) assignment to the rank holding the
expert, compute there, send the result back; batched, chunked and overlapped.

Notation (local variables; parameters and fields spell them out): T tokens on this rank, k
experts per token, D d_model, P ranks in the EP group, El expert slots on this rank (El_p on rank
p, n_slots in all: more than E with redundant experts), S slices (fine token slices, the unit
of counting), C chunks (the unit of overlap).

The flat pipeline of one MoE layer on one rank (`_exchange_and_compute`):

  1. slots = slot_of_expert[ids]        [T, k]  slots number (rank, local expert) rank by rank;
                                                -1: skip (dropped by capacity, or another node's)
  2. counts per slice                   [S, n_slots], sent with T as one message per peer:
     all_to_all_single(counts)          (S * El_p + 1) int64 to peer p, once per layer. The host
                                        waits here: split sizes must be Python ints, and C is
                                        chosen from the largest T any rank has, so all agree.
  3. for each chunk c (T / C tokens), in the order disp(0), disp(1), ret(0), disp(2), ret(1), ...
     which every rank issues identically:
       all_to_all_single(rows of c)     async; one message per (source, destination) pair
       wait disp(c); regroup received rows by local expert; grouped expert compute
       all_to_all_single(results of c)  async, back to the senders
     so the exchange of chunk c+1 and the return of chunk c-1 are in flight while c computes.
  4. wait the returns; per chunk, un-permute and combine with the router weights.

With `hierarchical`, a token crosses to each remote node at most once, to the rank with the same
local index there (which relays it to the experts of its node and sums their weighted outputs
before sending one row back), instead of once per assignment: see `_hierarchical`.

Every rank runs every step for every layer, also with T = 0 or nothing received. The pipeline is
a generator (`steps`, see `model/steps.py`) that yields before each wait for an exchange, so
that a second micro-batch's work can run while it is in flight (two-batch overlap); the number
and place of its yields depend only on what every rank agrees on (the chunk count, the path).
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

import torch
import torch.distributed as dist

from expertmesh.model.forward_context import current_forward
from expertmesh.model.moe import GroupedExperts, combine
from expertmesh.model.steps import Steps, run_steps
from expertmesh.parallel.exchange_stats import ExchangeStats
from expertmesh.parallel.in_flight import InFlight
from expertmesh.parallel.low_latency import LowLatencyExchange
from expertmesh.parallel.placement import slot_table
from expertmesh.parallel.replicas import BalancedReplicas
from expertmesh.split import split_evenly
from expertmesh.trace import span

AUTO_SLICES = 8               # fine slices counted per layer when the chunk count is automatic
# auto: split only while every chunk keeps this many assignments. Measured on 2 CPU ranks
# (benchmarks/overlap.py, small preset, 1024 tokens per rank): 2 chunks hid the whole exchange,
# 4 and 8 chunks were slower than none; below ~1k rows a chunk's fixed costs outweigh the overlap.
MIN_ROWS_PER_CHUNK = 1024
# The default `low_latency_threshold`: the low-latency exchange (`low_latency.py`) runs when the
# bound on every rank's tokens is at most this. Measured on 2 CPU ranks (benchmarks/low_latency.py,
# small preset, fp32): level with or faster than the standard exchange up to 64 tokens per rank,
# 0.8x at 256, where its fixed-size messages carry twice the rows that are needed.
LOW_LATENCY_TOKENS = 64
REPLICA_ROUTINGS = ("local", "balanced")


@dataclass
class Chunk:
    """One chunk of a layer's exchange. tokens: its slice of this rank's tokens; order `[n * k]`:
    its assignments grouped by slot (device); send / recv: rows to / from each peer (host ints);
    recv_by_expert `[P, El]`: rows from each peer per local expert (device); per_expert: rows per
    local expert (host ints)."""

    tokens: slice
    order: torch.Tensor
    send: list[int]
    recv: list[int]
    recv_by_expert: torch.Tensor
    per_expert: list[int]


class AllToAllDispatcher:
    """The EP step of an MoE block (replaces `LocalDispatcher`); see the module docstring.

    chunks: None chooses per call (1 for decode-sized batches); an int fixes it.
    overlap_chunks: False waits for every exchange as soon as it is issued (same chunks, same
    order: the synchronous reference of the overlapped path, bit for bit).
    peer_nodes: the node of each rank of the group (for byte counts and `hierarchical`).
    rank: this rank's index in `group` (and in `placement`).
    low_latency_threshold: the engine runs the low-latency exchange for a forward in which every
    rank has at most this many tokens (`parallel/expert.py`'s ExchangeChoice; 0: never); the
    forward's context carries the agreed bound (`model/forward_context.py`).
    replica_routing: "local" (each source's static replica of an expert, `slot_table`) or
    "balanced" (chosen per call from every rank's counts, `replicas.py`; a layer without
    replicas keeps the static table).
    may_drop: ids may be -1 (dropped by capacity); False spares the low-latency exchange zeroing
    the rows dropped assignments read.
    """

    def __init__(self, group: dist.ProcessGroup | None, placement: list[list[int]], n_experts: int,
                 rank: int, chunks: int | None = None, overlap_chunks: bool = True,
                 peer_nodes: list[int] | None = None, hierarchical: bool = False,
                 low_latency_threshold: int = LOW_LATENCY_TOKENS, replica_routing: str = "local",
                 may_drop: bool = True):
        self.group = group
        self.placement = placement
        self.options = dict(chunks=chunks, overlap_chunks=overlap_chunks, peer_nodes=peer_nodes, hierarchical=hierarchical,
                            low_latency_threshold=low_latency_threshold, replica_routing=replica_routing,
                            may_drop=may_drop)
        self.low_latency_threshold = 0 if hierarchical else low_latency_threshold
        self.n_ranks = len(placement)
        self.peer_nodes = peer_nodes or [0] * self.n_ranks
        self.rank = rank
        self.slots_per_rank = [len(experts) for experts in placement]  # may differ with replicas
        self.n_slots = sum(self.slots_per_rank)
        self.slot_rank = torch.repeat_interleave(torch.arange(self.n_ranks), torch.tensor(self.slots_per_rank))
        self.slot_node = torch.tensor([self.peer_nodes[r] for r in self.slot_rank.tolist()])
        self.n_experts = n_experts
        self.slots = slot_table(placement, n_experts, rank, self.peer_nodes)
        # The slot of each expert id, then of a dropped assignment (id -1 indexes the last entry),
        # so that one lookup maps ids to slots: -1 for "skip" (the standard and hierarchical
        # exchanges), or n_slots (the low-latency one, which sends skipped rows nowhere).
        self.slot_or_skip = torch.cat([self.slots, torch.tensor([-1])])
        self.slot_or_last = torch.where(self.slot_or_skip >= 0, self.slot_or_skip, self.n_slots)
        replicated = self.n_slots > n_experts
        self.balanced = (BalancedReplicas(group, placement, n_experts, rank, self.peer_nodes)
                         if replica_routing == "balanced" and replicated else None)
        self.slices = chunks or AUTO_SLICES
        self.auto = chunks is None
        self.overlap_chunks = overlap_chunks
        per_node = [self.peer_nodes.count(n) for n in set(self.peer_nodes)]
        if hierarchical and len(set(per_node)) > 1:
            raise ValueError(f"hierarchical exchange needs the same number of EP ranks on every "
                             f"node, got {sorted(per_node)}; use --gpus-per-node dividing ep")
        self.hierarchical = hierarchical and len(per_node) > 1
        self.stats = ExchangeStats()
        self.routing: Counter | None = None  # set to a Counter to record this rank's routing
        self.low_latency = LowLatencyExchange(group, self.slots_per_rank, rank, self.peer_nodes, may_drop)

    def switch(self, placement: list[list[int]]) -> None:
        """Route by `placement` from the next call: the same number of slots on every rank, other
        experts in some (online EPLB, `expert_moves.py`, once their weights are in place). The
        slot tables change in place (a captured graph keeps reading them)."""
        if [len(x) for x in placement] != self.slots_per_rank:
            raise ValueError("a switch keeps every rank's slot count")
        self.placement = placement
        self.slots.copy_(slot_table(placement, self.n_experts, self.rank, self.peer_nodes))
        self.slot_or_skip[:-1].copy_(self.slots)
        self.slot_or_last.copy_(torch.where(self.slot_or_skip >= 0, self.slot_or_skip, self.n_slots))
        if self.balanced is not None:
            self.balanced = BalancedReplicas(self.group, placement, self.n_experts, self.rank, self.peer_nodes)
        if self.stats.window_experts is not None:
            self.stats.window_experts.copy_(torch.tensor(placement[self.rank]))

    def __call__(self, x: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor,
                 experts: GroupedExperts) -> torch.Tensor:
        return run_steps(self.steps(x, ids, weights, experts))

    def steps(self, x: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor,
              experts: GroupedExperts) -> Steps[torch.Tensor]:
        """x `[T, D]`, ids `[T, k]` (-1: dropped), weights `[T, k]` -> weighted sums `[T, D]`, as a
        generator that yields while an exchange is in flight. The forward's context
        (`model/forward_context.py`) may carry a bound on every rank's T, the same on every rank,
        under which the low-latency exchange runs (None: the standard one)."""
        low_latency_tokens = current_forward().low_latency_tokens
        if self.routing is not None and ids.numel():
            choices, tokens = torch.unique(ids.sort(dim=1).values, dim=0, return_counts=True)
            self.routing.update({tuple(e for e in c if e >= 0): n  # -1: dropped by capacity
                                 for c, n in zip(choices.tolist(), tokens.tolist())})
        if self.slot_or_skip.device != ids.device:  # once: a copy per call would wait for the device
            self.slot_or_skip, self.slot_or_last = self.slot_or_skip.to(ids.device), self.slot_or_last.to(ids.device)
        if self.balanced is not None:
            with span("replica choice"):
                slots = self.balanced(ids)
        elif low_latency_tokens is not None and not self.hierarchical:
            slots = self.slot_or_last[ids]
        else:
            slots = self.slot_or_skip[ids]
        if self.hierarchical:
            return (yield from self._hierarchical(x, slots, weights, experts))
        if low_latency_tokens is not None:
            skipped_last = slots if self.balanced is None else torch.where(slots >= 0, slots, self.n_slots)
            return (yield from self.low_latency.steps(x, skipped_last, weights, experts, low_latency_tokens,
                                                      self.stats))
        return (yield from self._exchange_and_compute(x, slots, weights, experts))

    # -- flat, chunked exchange ------------------------------------------------------------

    def _exchange_and_compute(self, x: torch.Tensor, slots: torch.Tensor, weights: torch.Tensor,
                              experts: GroupedExperts) -> Steps[torch.Tensor]:
        """x `[T, D]`, slots `[T, k]` (-1: not here), weights `[T, k]` -> weighted sums `[T, D]`."""
        T, k = slots.shape
        slots = torch.where(slots >= 0, slots, self.n_slots)  # skipped assignments sort last, unsent
        slices = split_evenly(T, self.slices)
        counts = self._count_by_slice(slots, slices)  # [S, n_slots], on x's device
        received = yield from self._exchange_counts(counts, T).wait()  # [P, S * El + 1]
        chunks = self._plan_chunks(slots, slices, counts, received)
        row_bytes = x.shape[1] * x.element_size()
        for chunk in chunks:  # rows go out, and results come back to their senders
            for splits in (chunk.send, chunk.recv):
                self.stats.add(splits, self.peer_nodes, self.peer_nodes[self.rank], row_bytes)

        returns = []
        in_flight = self._dispatch(x, chunks[0], k)
        for c, chunk in enumerate(chunks):
            following = self._dispatch(x, chunks[c + 1], k) if c + 1 < len(chunks) else None
            results = self._compute((yield from in_flight.wait()), chunk, experts)
            returns.append(self._start(results, chunk.send, chunk.recv, "combine exchange"))
            in_flight = following

        parts = []
        for chunk, flight in zip(chunks, returns):
            back = yield from flight.wait()
            with span("combine"):
                if back.shape[0] < chunk.order.numel():  # skipped assignments contribute exact zeros
                    back = torch.cat([back, back.new_zeros(chunk.order.numel() - back.shape[0], x.shape[1])])
                parts.append(combine(back, chunk.order, weights[chunk.tokens]))
        return parts[0] if len(parts) == 1 else torch.cat(parts)

    def _count_by_slice(self, slots: torch.Tensor, slices: list[slice]) -> torch.Tensor:
        """slots `[T, k]` (n_slots: skipped) -> assignments per (fine slice, slot) `[S, n_slots]`,
        computed on the device without a host sync."""
        T, k = slots.shape
        S, width = len(slices), self.n_slots + 1
        base, extra = divmod(T, S)  # split_evenly: the first `extra` slices hold base + 1 tokens
        token = torch.arange(T, device=slots.device)
        in_big = extra * (base + 1)
        slice_of_token = torch.where(token < in_big, token // (base + 1), extra + (token - in_big) // max(base, 1))
        cell = (slice_of_token[:, None] * width + slots).reshape(-1)
        counts = torch.zeros(S * width, dtype=torch.long, device=slots.device)
        counts.index_add_(0, cell, torch.ones_like(cell))
        return counts.view(S, width)[:, :-1]

    def _exchange_counts(self, counts: torch.Tensor, tokens: int) -> InFlight:
        """Start sending each peer the counts of its slots per slice, and this rank's token count:
        (S * El_p + 1) int64 to peer p; what every peer sends us arrives as `[P, S * El + 1]`."""
        S, El = counts.shape[0], self.slots_per_rank[self.rank]
        tail = torch.full((1,), tokens, dtype=torch.long, device=counts.device)
        message = torch.cat([t for part in counts.split(self.slots_per_rank, dim=1)
                             for t in (part.reshape(-1), tail)])
        received = torch.empty(self.n_ranks, S * El + 1, dtype=torch.long, device=counts.device)
        work = dist.all_to_all_single(received.view(-1), message, [S * El + 1] * self.n_ranks,
                                      [S * n + 1 for n in self.slots_per_rank], group=self.group,
                                      async_op=True)
        return self._in_flight(received, work, "count exchange")

    def _plan_chunks(self, slots: torch.Tensor, slices: list[slice], counts: torch.Tensor,
                     received: torch.Tensor) -> list[Chunk]:
        """slots `[T, k]`, this rank's slices of T, counts `[S, n_slots]` it sends, counts
        `[P, S * El + 1]` it received -> the chunks of this call. Split sizes of every chunk, from one copy of the counts to the host: the one host sync
        of the layer (all_to_all_single takes its splits as Python ints, and the chunk count is
        chosen from the largest T of any rank, so that all ranks agree)."""
        S, P, El = len(slices), self.n_ranks, self.slots_per_rank[self.rank]
        k = slots.shape[1]
        with span("count sync"):
            host = torch.cat([counts.reshape(-1), received.reshape(-1)]).cpu()
        sent_h = host[:counts.numel()].view(S, self.n_slots)
        received_h = host[counts.numel():].view(P, S * El + 1)
        from_peer_h = received_h[:, :-1].view(P, S, El)  # [source, fine slice, local expert]
        from_peer = received[:, :-1].view(P, S, El)
        n_chunks = self._chunk_count(int(received_h[:, -1].max()) * k)
        self.stats.loads.append(from_peer_h.sum((0, 1)).tolist())
        self.stats.count_window(lambda: from_peer.sum((0, 1)))
        chunks = []
        for c in range(n_chunks):
            mine = slice(c * S // n_chunks, (c + 1) * S // n_chunks)  # the chunk's slices
            tokens = slice(slices[mine.start].start, slices[mine.stop - 1].stop)
            send = torch.zeros(P, dtype=torch.long).index_add_(0, self.slot_rank, sent_h[mine].sum(0)).tolist()
            by_expert_h = from_peer_h[:, mine].sum(1)  # [P, El]
            order = torch.argsort(slots[tokens].reshape(-1), stable=True)
            chunks.append(Chunk(tokens, order, send, by_expert_h.sum(1).tolist(),
                                from_peer[:, mine].sum(1), by_expert_h.sum(0).tolist()))
        return chunks

    def _dispatch(self, x: torch.Tensor, chunk: Chunk, k: int):
        """Start sending the chunk's assignment rows `[sum(send), D]`, grouped by destination."""
        rows = x[chunk.tokens.start + chunk.order[:sum(chunk.send)] // k]
        return self._start(rows, chunk.recv, chunk.send, "dispatch exchange")

    def _compute(self, rows: torch.Tensor, chunk: Chunk, experts: GroupedExperts) -> torch.Tensor:
        """Received rows `[R, D]`, source-major -> expert outputs `[R, D]` in the same order."""
        with span("expert compute"):
            regroup, per_expert = _group_by_local_expert(chunk.recv_by_expert, sum(chunk.recv))
            computed = experts(rows[regroup], per_expert, chunk.per_expert)
            results = torch.empty_like(computed)
            results[regroup] = computed
        return results

    def _start(self, rows: torch.Tensor, out_splits: list[int], in_splits: list[int], name: str) -> InFlight:
        out = rows.new_empty(sum(out_splits), rows.shape[1])
        work = dist.all_to_all_single(out, rows.contiguous(), out_splits, in_splits,
                                      group=self.group, async_op=True)
        return self._in_flight(out, work, name)

    def _in_flight(self, out: torch.Tensor, work: dist.Work, name: str) -> InFlight:
        flight = InFlight(out, work, name)
        if not self.overlap_chunks:
            flight.finish()
        return flight

    def _chunk_count(self, max_assignments: int) -> int:
        if not self.auto:
            return self.slices
        chunks = 1
        while chunks < self.slices and max_assignments // (2 * chunks) >= MIN_ROWS_PER_CHUNK:
            chunks *= 2
        return chunks

    # -- hierarchical exchange -------------------------------------------------------------

    def _hierarchical(self, x: torch.Tensor, slots: torch.Tensor, weights: torch.Tensor,
                      experts: GroupedExperts) -> Steps[torch.Tensor]:
        """Two-level exchange over the same group (zero splits to the other ranks):

        A. each token goes once to every remote node holding one of its experts, to the rank
           with this rank's local index there (the relay), with its slots and weights on that
           node (`[rows, D]` + `[rows, 2k]` fp32 metadata cross the node boundary);
        B. a flat exchange inside the node (own tokens + relayed rows) computes every
           assignment and sums each row's weighted outputs;
        A'. the relay sends that one partial sum per row back across the boundary.
        The token's output is the sum of its per-node partials: with k <= 2 exactly the flat
        path's result (a sum of two terms does not depend on their order).
        """
        T, k = slots.shape
        node_of = self.slot_node.to(slots.device)[slots.clamp(min=0)]  # [T, k]
        nodes = sorted(set(self.peer_nodes))
        me, my_node = self.rank, self.peer_nodes[self.rank]
        local_index = [r for r in range(self.n_ranks) if self.peer_nodes[r] == my_node].index(me)
        relay_of = {n: [r for r in range(self.n_ranks) if self.peer_nodes[r] == n][local_index] for n in nodes}

        on_node = [(node_of == n) & (slots >= 0) for n in nodes]  # [T, k] per node
        token_idx, meta, splits = [], [], [0] * self.n_ranks
        for n, mask in zip(nodes, on_node):
            if n == my_node:
                continue
            rows = mask.any(dim=1).nonzero().squeeze(1)
            token_idx.append(rows)
            meta.append(torch.cat([torch.where(mask[rows], slots[rows], -1).float(),
                                   torch.where(mask[rows], weights[rows].float(), 0.0)], dim=1))
            splits[relay_of[n]] = rows.numel()
        token_idx, meta = torch.cat(token_idx), torch.cat(meta)  # one part per remote node, at least one

        recv_splits = self._exchange_splits(splits, x.device)
        self.stats.add(splits, self.peer_nodes, my_node, x.shape[1] * x.element_size() + 8 * k)
        with span("relay exchange"):
            relayed = self._a2a(x[token_idx], recv_splits, splits)
            relayed_meta = self._a2a(meta, recv_splits, splits)

        mine = on_node[nodes.index(my_node)]
        local_x = torch.cat([x, relayed])
        local_slots = torch.cat([torch.where(mine, slots, -1), relayed_meta[:, :k].long()])
        local_w = torch.cat([torch.where(mine, weights, 0), relayed_meta[:, k:].to(weights.dtype)])
        partial = yield from self._exchange_and_compute(local_x, local_slots, local_w, experts)

        with span("relay return"):
            back = self._a2a(partial[T:], splits, recv_splits)
        self.stats.add(recv_splits, self.peer_nodes, my_node, x.shape[1] * x.element_size())
        return partial[:T].index_add(0, token_idx, back)

    def _exchange_splits(self, splits: list[int], device: torch.device) -> list[int]:
        """Rows to each peer -> rows from each peer (a host sync: the relay's sizes)."""
        send = torch.tensor(splits, dtype=torch.long, device=device)
        recv = torch.empty_like(send)
        dist.all_to_all_single(recv, send, group=self.group)
        return recv.tolist()

    def _a2a(self, rows: torch.Tensor, out_splits: list[int], in_splits: list[int]) -> torch.Tensor:
        out = rows.new_empty(sum(out_splits), rows.shape[1])
        dist.all_to_all_single(out, rows.contiguous(), out_splits, in_splits, group=self.group)
        return out


def _group_by_local_expert(recv_by_expert: torch.Tensor, rows: int) -> tuple[torch.Tensor, torch.Tensor]:
    """`rows` rows received source-major (`recv_by_expert [P, El]` counts, on their device) ->
    order grouping them by local expert `[rows]`, and the count per local expert `[El]`."""
    P, El = recv_by_expert.shape
    local_expert = torch.arange(P * El, device=recv_by_expert.device) % El
    expert_of_row = torch.repeat_interleave(local_expert, recv_by_expert.reshape(-1), output_size=rows)
    return torch.argsort(expert_of_row, stable=True), recv_by_expert.sum(0)
