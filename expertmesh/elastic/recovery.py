"""Elastic expert parallelism on one rank: notice a dead rank, regroup without it, carry on.

Detection. The launcher (`launch.py`, `elastic=True`) marks a rank that died `dead-<rank>` beside
the file store; a rank that hangs it kills first, from the ranks' heartbeats (`heartbeat.py`,
`--hang-timeout`), so that it dies. A survivor notices in one of two ways, whichever comes first:
  - its collective fails (gloo: "Connection closed by peer" from the dead rank's socket);
  - its watch thread sees a new marker (polled every `WATCH_S`) and breaks this process's gloo
    connections (`sockets.py`), so that a survivor blocked on another survivor (itself blocked
    on the dead rank) leaves its collective at once instead of at the group's timeout.
A failed step with no new marker within `--timeout` is a real error: it is raised as before.

Regrouping (`Elastic.recover`, every survivor, each on its own after its step failed):
  1. the dead set is read; its keys name a fresh rendezvous, a new file store beside the old one
     (`store.without-2-3`), so that nothing of the broken groups is reused;
  2. the old groups are destroyed, the survivors meet (a counting barrier on the new store,
     which restarts under a new name when another rank dies meanwhile) and form the new default
     group, renumbered in their old order (stage by stage), of the survivors' size; a pipeline
     stage with no survivor ends the run (`layout.py: StageLost`, raised on rank 0: exit 1);
  3. each stage's survivors form its EP group (`mesh.groups_of`) and its EP layers move to the
     survivors' placement (`experts.py`): a replica keeps serving, an expert without one is
     loaded onto the least-loaded survivor of that stage;
  4. one all-gather tells every rank what each scheduler holds (request id -> tokens generated
     so far, with its data-parallel rank and stats) and the experts moved; every rank works
     out the same data-parallel slots (`slots.py`: a pipeline that lost no rank stays, the
     survivors of broken ones pair up, `layout.py`; a pipeline keeps its scheduler and KV cache
     where all its copies agree, or where some are one step behind the last stage's (a step cut
     after it sampled: they finish it from its outputs, `Engine.catch_up`), else starts empty,
     `Engine.restart`; a rank left over serves experts only), a second all-gather shares the
     stats, and the engine resumes as rank `new rank` on its new pipeline links
     (`Engine.resume`). Under one stage every survivor keeps its own scheduler. Rank 0 then
     (`ledger.py`) streams the tokens a kept scheduler generated that the failed step never
     sent (with a step caught up, its outputs as the last stage made them), re-queues every
     request no kept scheduler holds (the dead rank's pipeline's, and any whose step message
     was lost) with the tokens already streamed, which are recomputed, not sent again, and
     aborts what a survivor holds that is no longer in flight.
Rank 0 dying is not survived: the launcher ends the run (exit 1).

What crosses the network: at start-up one all-gather of every rank's pid; in a recovery, the
barrier's counter on the file store, the new groups' rendezvous and two all-gathers (the
schedulers' holdings: a request id and its generated token ids per sequence, the step each
scheduled and did not finish and, from a last stage, the step it finished last (a request id
and token count per sequence, and its outputs), and the experts moved; then the stats); no
weights.
"""

from __future__ import annotations

import os
import pickle
import sys
import threading
import time
from dataclasses import dataclass, field

import torch
import torch.distributed as dist

from expertmesh import heartbeat
from expertmesh.deployment import Deployment
from expertmesh.elastic.experts import reshard, reshard_join
from expertmesh.elastic.layout import Layout, StageLost
from expertmesh.elastic.slots import Copy, links_of, plan_slots, relabel, slot_of
from expertmesh.elastic.sockets import break_connections
from expertmesh.launch import JOINED_PREFIX, dead_ranks, init_group, write_marker
from expertmesh.parallel.mesh import groups_of

WATCH_S = 0.02  # how often the watch thread looks for new markers
JOIN_TICKET = "join-ticket"  # beside the store: what a joining process needs (`elastic/join.py`)
JOIN_REQUEST, JOIN_ANSWER = "join-request-", "join-answer-"  # + the joining process's pid
MEET_POLL_S = 0.005  # how often a survivor reads the barrier's count


@dataclass(frozen=True)
class Recovery:
    """One recovery, as rank 0 reports it: the ranks lost (original numbers) and how each ended,
    the layout after, {layer: {expert: new holder (original rank)}} of the
    experts loaded elsewhere and of the dead ranks' other experts (still held by a survivor),
    the seconds from the failed step to the new groups with every survivor's experts in place,
    what the kept schedulers hold: {request id: tokens generated so far}, and under pipeline
    stages how many data-parallel ranks kept their scheduler and how many started empty, how
    many of the kept ones caught up a step (`slots.py`), and that step's outputs, which rank 0
    never received."""

    lost: dict[int, str]
    layout: Layout
    moves: dict[int, dict[int, int]]
    served: dict[int, dict[int, int]]
    seconds: float
    held: dict
    kept: int = 0
    empty: int = 0
    caught_up: int = 0
    outputs: list = field(default_factory=list)

    @property
    def hung(self) -> int:
        """How many of the ranks lost hung, and were killed for it (`heartbeat.py`)."""
        return sum(heartbeat.was_hung(how) for how in self.lost.values())

    def describe(self) -> str:
        lost = ", ".join(f"rank {r} ({how})" for r, how in sorted(self.lost.items()))
        behind = f" ({self.caught_up} caught up a step)" if self.caught_up else ""
        pipelines = (f" (schedulers kept: {self.kept}{behind}, started empty: {self.empty})"
                     if len(self.layout.stages) > 1 else "")
        return (f"elastic: lost {lost}; now {self.layout.describe()}{pipelines}; experts loaded anew: "
                f"{_moves(self.moves)}; still served by surviving copies: {_moves(self.served)}; "
                f"recovered in {self.seconds:.2f} s")


@dataclass(frozen=True)
class Admission:
    """A rank that joined, as rank 0 reports it: its number (the next unused original rank) and
    pid, the EP size after, {layer: {expert: the original rank that gave it up}}, the seconds from
    the step boundary to the joined group with every expert in place."""

    rank: int
    pid: int
    ep: int
    moves: dict[int, dict[int, int]]
    seconds: float

    def describe(self) -> str:
        return (f"elastic: rank {self.rank} (pid {self.pid}) joined; now ep{self.ep}; experts it "
                f"took: {_moves(self.moves, 'from')}; joined in {self.seconds:.2f} s")


def _copy(engine) -> Copy:
    """`engine`'s copy of its scheduler, as `plan_slots` compares them."""
    seqs = (*engine.scheduler.running, *engine.scheduler.waiting)
    return Copy(engine.dp, {s.request.id: s.tokens[len(s.request.prompt):] for s in seqs},
                engine.scheduler.stats(), engine.finished,
                None if engine.open is None else _pairs(engine.open),
                None if engine.last is None else (_pairs(engine.last[0]), engine.last[1]))


def _pairs(chosen: list) -> tuple:
    """A step's (sequence, new tokens) as (request id, new tokens) pairs: what copies compare."""
    return tuple((seq.request.id, n) for seq, n in chosen)


def _moves(per_layer: dict[int, dict[int, int]], way: str = "->") -> str:
    """"expert 8 -> rank 0; ..." (or "from rank 0") with the layers named where it is not every layer."""
    moved: dict[tuple[int, int], list[int]] = {}
    for layer, experts in per_layer.items():
        for expert, rank in experts.items():
            moved.setdefault((expert, rank), []).append(layer)
    parts = [f"expert {e} {way} rank {r}" + ("" if len(ls) == len(per_layer) else f" (layers {ls})")
             for (e, r), ls in sorted(moved.items())]
    return "; ".join(parts) or "none"


class Elastic:
    """This rank's side of elastic recovery (see the module's docstring) in a run of
    `deployment`. Collective to build: every rank gathers every rank's pid; a rank that joined
    (`elastic/join.py`) is built from `joined` instead, what rank 0 sent it (`admission_state`)."""

    def __init__(self, deployment: Deployment, store_path: str, device: torch.device, timeout: float,
                 checkpoint: str | None, seed: int, dtype: torch.dtype, joined: dict | None = None):
        self.store_path, self.device, self.timeout = store_path, device, timeout
        self.checkpoint, self.seed, self.dtype = checkpoint, seed, dtype
        if joined is None:
            pids: list = [None] * dist.get_world_size()
            dist.all_gather_object(pids, os.getpid())
            joined = dict(layout=Layout.of(deployment), pids=pids, lost={}, configured=dist.get_world_size())
        self.layout: Layout = joined["layout"]  # original ranks per stage, in group order
        self.original = self.layout.members[dist.get_rank()]
        self.pids: list[int] = joined["pids"]  # by original rank, joined ranks included
        self.lost: dict[int, str] = dict(joined["lost"])  # original rank -> how it ended, once handled
        self.configured: int = joined["configured"]
        self.handled: set[int] = set(self.lost)  # dead ranks whose groups are being, or were, left
        # rank 0: /metrics' dp_rank label of each data-parallel rank, and the next unused one
        self.labels = list(range(len(self.layout.pipelines)))
        self.fresh = len(self.labels)
        self.recoveries: list[Recovery] = []
        self.asking = False  # rank 0: a join request waits beside the store (seen by `_watch`)
        self.lock = threading.Lock()
        threading.Thread(target=self._watch, name="elastic watch", daemon=True).start()

    @property
    def members(self) -> list[int]:
        """The original ranks, in the order of the default group's."""
        return self.layout.members

    def ranks(self) -> list[dict]:
        """Every original rank, joined ones last: {"rank", "pid", "state": "ok" or "dead"}."""
        return [{"rank": r, "pid": pid, "state": "dead" if r in self.lost else "ok"}
                for r, pid in enumerate(self.pids)]

    @property
    def degraded(self) -> bool:
        """Fewer ranks than the deployment was started with."""
        return len(self.members) < self.configured

    def _watch(self) -> None:
        broken: set[int] = set()
        while True:
            time.sleep(WATCH_S)
            with self.lock:
                try:
                    dead = dead_ranks(self.store_path)
                    if self.original == 0:  # off the step loop: `join_request` looks only then
                        folder = os.path.dirname(self.store_path)
                        self.asking = any(n.startswith(JOIN_REQUEST) for n in os.listdir(folder))
                except FileNotFoundError:  # the launcher ended and removed the store: so does this rank
                    print("error: the server's launcher is gone; exiting", file=sys.stderr, flush=True)
                    os._exit(1)
                new = set(dead) - self.handled - broken
                if new:
                    broken |= new
                    break_connections()

    def recover(self, engine, model, error: BaseException) -> Recovery:
        """After this rank's step failed with `error`: regroup without the dead ranks, move
        their experts, resume `engine`; raises `error` when no rank was marked dead in time, and
        `StageLost` when a pipeline stage has no rank left (on rank 0; another rank waits for
        the launcher to end it, so that rank 0 alone says why). Not watched for hangs until
        regrouped (reading experts may take long): `--timeout` bounds it."""
        if (beat := heartbeat.mine()) is not None:
            beat.pause()
        started = time.monotonic()
        deadline = started + self.timeout
        while True:
            dead = dead_ranks(self.store_path)
            if set(dead) - set(self.lost):
                break
            if time.monotonic() > deadline:
                raise error
            time.sleep(WATCH_S)
        if 0 in dead:
            raise RuntimeError("rank 0 died; it is not survived") from error
        try:
            layout, dead = self._meet(dead, deadline)
        except StageLost:
            if self.original != 0:
                time.sleep(self.timeout)
            raise
        moves, served = self._reshard(model, layout, dead)
        slots, held, outputs = self._resume(engine, layout, moves, served)
        if beat is not None:  # regrouped, experts in place: the next step is watched
            beat.arm()
        lost = {r: how for r, how in dead.items() if r not in self.lost}
        self.lost.update(lost)
        self.layout = layout
        kept = sum(s.kept is not None for s in slots)
        report = Recovery(lost, layout, moves, served, time.monotonic() - started, held,
                          kept, len(slots) - kept, sum(bool(s.behind) for s in slots), outputs)
        self.recoveries.append(report)
        return report

    def _reshard(self, model, layout: Layout, dead: dict[int, str]) -> tuple[dict, dict]:
        """Form every stage's EP group over `layout` (collective) and move this stage's dead
        ranks' experts to its survivors (`experts.reshard`): (moves, served) as `Recovery`'s,
        for this stage's layers."""
        members = layout.members
        group = groups_of([[members.index(r) for r in ranks] for ranks in layout.stages],
                          members.index(self.original))
        stage = layout.stage_of(self.original)
        before, after = self.layout.stages[stage], layout.stages[stage]
        gone = {i for i, r in enumerate(before) if r in dead}
        moves, served = reshard(model, group, after.index(self.original), gone, self.checkpoint,
                                self.seed, self.dtype)
        return ({layer: {e: after[i] for e, i in m.items()} for layer, m in moves.items()},
                {layer: {e: after[i] for e, i in m.items()} for layer, m in served.items()})

    def _resume(self, engine, layout: Layout, moves: dict, served: dict):
        """Agree on the data-parallel slots (`slots.py`: one all-gather of what each scheduler
        holds, and of the moves for rank 0's log), restart this rank's scheduler where its
        pipeline keeps none, share the stats (a second all-gather) and resume `engine` on its
        new links; a copy one step behind its last stage's catches up first. Fills `moves` and
        `served` with every stage's; returns (the slots, what the kept schedulers hold: {request
        id: tokens generated so far}, the outputs of the steps caught up)."""
        members = layout.members
        everyone: list = [None] * len(members)  # also a barrier: the time is the slowest's
        dist.all_gather_object(everyone, (_copy(engine), moves, served))
        for _, m, s in everyone:
            moves.update(m)
            served.update(s)
        before = {r: e[0] for r, e in zip(members, everyone)}
        slots = plan_slots(layout, before)
        slot = slot_of(slots, self.original)
        if slot is None or slots[slot].kept is None:
            engine.restart()
        elif self.original in slots[slot].behind:
            engine.catch_up(before[slots[slot].pipeline[-1]].last[1])
        stats: list = [None] * len(members)
        dist.all_gather_object(stats, engine.scheduler.stats())
        kept = [s.kept for s in slots]
        engine.resume(members.index(self.original), slot, kept,
                      [stats[members.index(s.pipeline[-1])] for s in slots],
                      links_of(layout, slots, self.original, self.device))
        self.labels, self.fresh = relabel(self.labels, kept, self.fresh)
        held = {k: v for s in slots if s.kept is not None for k, v in before[s.pipeline[-1]].held.items()}
        caught_up = [o for s in slots if s.behind for o in before[s.pipeline[-1]].last[1]]
        return slots, held, caught_up

    def _meet(self, dead: dict[int, str], deadline: float) -> tuple[Layout, dict[int, str]]:
        """Destroy the old groups and form the survivors' default group; (the survivors' layout,
        the dead ranks it was formed without). `StageLost` when a stage has no rank left."""
        with self.lock:  # the watch thread breaks no new group's sockets for these ranks
            self.handled |= set(dead)
            dist.destroy_process_group()
        while True:
            layout = self.layout.without(dead)
            survivors = layout.members
            name = "-".join(map(str, sorted(dead)))
            store = dist.FileStore(f"{self.store_path}.without-{name}", len(survivors))
            store.add("arrived", 1)
            while (n := store.add("arrived", 0)) < len(survivors):
                again = dead_ranks(self.store_path)
                if set(again) != set(dead):
                    break
                if time.monotonic() > deadline:
                    raise RuntimeError(f"the survivors {survivors} did not all meet within "
                                       f"{self.timeout:.0f} s")
                time.sleep(MEET_POLL_S)
            if n < len(survivors):
                dead = again
                with self.lock:
                    self.handled |= set(dead)
                continue
            init_group("gloo", store, survivors.index(self.original), len(survivors),
                       self.timeout, self.device)
            return layout, dead

    # ---- a rank joins (`serve --join`, `elastic/join.py`) ----
    def write_ticket(self, ticket: dict) -> str:
        """Rank 0: leave `ticket` (what a joining process needs to build its rank) beside the
        store, where the front ends point a joining process (`/admin/join`); returns its path."""
        path = os.path.join(os.path.dirname(self.store_path), JOIN_TICKET)
        write_marker(path, pickle.dumps(ticket))
        return path

    def join_request(self) -> tuple[int, int, str] | None:
        """Rank 0, between steps: the first joining process that asked, admitted as (pid, its
        original rank, the joined group's store), else None. Its answer file says the same (or
        why not: the deployment is at its configured size); the launcher watches its pid from
        then on (`launch.py`). Between steps it costs an attribute read unless the watch thread
        saw a request."""
        if not self.asking:
            return None
        folder = os.path.dirname(self.store_path)
        asking = sorted(int(n[len(JOIN_REQUEST):]) for n in os.listdir(folder)
                        if n.startswith(JOIN_REQUEST) and n[len(JOIN_REQUEST):].isdigit())
        for pid in asking:
            os.remove(os.path.join(folder, f"{JOIN_REQUEST}{pid}"))
            answer = os.path.join(folder, f"{JOIN_ANSWER}{pid}")
            if len(self.layout.stages) > 1:  # `join.ticket` refuses first; a request written by hand
                write_marker(answer, pickle.dumps(("refused", "the deployment has pipeline stages; "
                                                   "a rank joins plain expert parallelism only")))
                continue
            if not self.degraded:
                write_marker(answer, pickle.dumps(("refused", f"the deployment already has its "
                                                   f"{self.configured} ranks; none is missing")))
                continue
            rank = len(self.pids)
            store = f"{self.store_path}.join-{rank}"
            write_marker(os.path.join(folder, f"{JOINED_PREFIX}{rank}"), str(pid).encode())
            write_marker(answer, pickle.dumps(("admitted", rank, store, len(self.members) + 1)))
            return pid, rank, store
        return None

    def admission_state(self, model, pid: int, rank: int) -> dict:
        """What a joining rank gets from rank 0: the group's layout, pids and losses (as
        `__init__` takes them), every EP layer's placement and dispatcher options before the
        join, and the experts' kernel plan."""
        from expertmesh.parallel.expert import dispatchers
        layers = dispatchers(model)
        first = model.layers[str(next(iter(layers)))].moe.experts
        return dict(layout=self.layout.with_rank(rank), pids=self.pids + [pid], lost=self.lost,
                    configured=self.configured, kernels=first.kernels,
                    placements={i: (d.placement, d.options) for i, d in layers.items()})

    def admit(self, engine, model, join: tuple[int, int, str]) -> Admission:
        """Every rank of the group, at the step boundary rank 0 chose (`Engine.joined`): leave
        the group, form the joined one with the new rank last, hand it the state it needs, give
        it experts (`reshard_join`), resume `engine` as a rank of ep<N+1>. Not watched for hangs
        meanwhile (the newcomer may take long to build its experts): `--timeout` bounds it."""
        if (beat := heartbeat.mine()) is not None:
            beat.pause()
        started = time.monotonic()
        pid, new, store_path = join
        layout = self.layout.with_rank(new)
        members = layout.members
        with self.lock:
            dist.destroy_process_group()
        rank = members.index(self.original)
        store = dist.FileStore(store_path, len(members))
        init_group("gloo", store, rank, len(members), self.timeout, self.device)
        group = groups_of([list(range(len(members)))], rank)
        box = [self.admission_state(model, pid, new) if rank == 0 else None]
        dist.broadcast_object_list(box, src=0)
        moves = reshard_join(model, group, rank)
        everyone: list = [None] * len(members)  # also a barrier: the time is the slowest's
        dist.all_gather_object(everyone, engine.scheduler.stats())
        kept = [*range(len(self.members)), None]  # one stage: each rank its own scheduler
        engine.resume(rank, rank, kept, everyone)
        self.labels, self.fresh = relabel(self.labels, kept, self.fresh)
        if beat is not None:
            beat.arm()
        donors = self.members
        self.layout, self.pids = layout, box[0]["pids"]
        return Admission(new, pid, len(members),
                         {layer: {e: donors[i] for e, i in m.items()} for layer, m in moves.items()},
                         time.monotonic() - started)
