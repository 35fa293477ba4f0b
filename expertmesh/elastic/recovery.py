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
     group, renumbered in their old order, of the survivors' size;
  3. the EP layers move to the survivors' placement (`experts.py`): a replica keeps serving, an
     expert without one is loaded onto the least-loaded survivor;
  4. the engine resumes as rank `new rank` of `ep<survivors>`, each survivor's scheduler and KV
     cache kept (`Engine.resume`); one all-gather tells every rank what each scheduler holds
     (request id -> tokens generated so far) and its stats. Rank 0 then (`ledger.py`) streams
     the tokens a survivor generated that the failed step never sent, re-queues every request
     no survivor holds (the dead rank's, and any whose step message was lost) with the tokens
     already streamed, which are recomputed, not sent again, and aborts what a survivor holds
     that is no longer in flight.
Rank 0 dying is not survived: the launcher ends the run (exit 1).

What crosses the network: at start-up one all-gather of every rank's pid; in a recovery, the
barrier's counter on the file store, the new groups' rendezvous and one all-gather of the
schedulers' holdings (a request id and its generated token ids per sequence); no weights.
"""

from __future__ import annotations

import os
import threading
import time
from dataclasses import dataclass

import torch
import torch.distributed as dist

from expertmesh import heartbeat
from expertmesh.deployment import Deployment
from expertmesh.elastic.experts import reshard
from expertmesh.elastic.sockets import break_connections
from expertmesh.launch import dead_ranks, init_group
from expertmesh.parallel.mesh import stage_group

WATCH_S = 0.02  # how often the watch thread looks for new markers
MEET_POLL_S = 0.005  # how often a survivor reads the barrier's count


@dataclass(frozen=True)
class Recovery:
    """One recovery, as rank 0 reports it: the ranks lost (original numbers) and how each ended,
    the EP size after, {layer: {expert: new holder (original rank)}} of the experts loaded
    elsewhere and of the dead ranks' other experts (still held by a survivor), the seconds from
    the failed step to the new groups with every survivor's experts in place, and what the
    survivors' schedulers hold: {request id: tokens generated so far}."""

    lost: dict[int, str]
    ep: int
    moves: dict[int, dict[int, int]]
    served: dict[int, dict[int, int]]
    seconds: float
    held: dict

    @property
    def hung(self) -> int:
        """How many of the ranks lost hung, and were killed for it (`heartbeat.py`)."""
        return sum(heartbeat.was_hung(how) for how in self.lost.values())

    def describe(self) -> str:
        lost = ", ".join(f"rank {r} ({how})" for r, how in sorted(self.lost.items()))
        return (f"elastic: lost {lost}; now ep{self.ep}; experts loaded anew: {_moves(self.moves)}; "
                f"still served by surviving copies: {_moves(self.served)}; recovered in {self.seconds:.2f} s")


def _moves(per_layer: dict[int, dict[int, int]]) -> str:
    """"expert 8 -> rank 0; ..." with the layers named where it is not every layer."""
    moved = {}
    for layer, experts in per_layer.items():
        for expert, rank in experts.items():
            moved.setdefault((expert, rank), []).append(layer)
    parts = [f"expert {e} -> rank {r}" + ("" if len(ls) == len(per_layer) else f" (layers {ls})")
             for (e, r), ls in sorted(moved.items())]
    return "; ".join(parts) or "none"


class Elastic:
    """This rank's side of elastic recovery (see the module's docstring). Collective to build:
    every rank gathers every rank's pid."""

    def __init__(self, store_path: str, device: torch.device, timeout: float,
                 checkpoint: str | None, seed: int, dtype: torch.dtype):
        self.store_path, self.device, self.timeout = store_path, device, timeout
        self.checkpoint, self.seed, self.dtype = checkpoint, seed, dtype
        self.original = dist.get_rank()
        self.members = list(range(dist.get_world_size()))  # original ranks, in group order
        pids: list = [None] * dist.get_world_size()
        dist.all_gather_object(pids, os.getpid())
        self.pids: list[int] = pids
        self.lost: dict[int, str] = {}  # original rank -> how it ended, once handled
        self.handled: set[int] = set()  # dead ranks whose groups are being, or were, left
        self.recoveries: list[Recovery] = []
        self.lock = threading.Lock()
        threading.Thread(target=self._watch, name="elastic watch", daemon=True).start()

    def ranks(self) -> list[dict]:
        """Every original rank: {"rank", "pid", "state": "ok" or "dead"}."""
        return [{"rank": r, "pid": pid, "state": "dead" if r in self.lost else "ok"}
                for r, pid in enumerate(self.pids)]

    def _watch(self) -> None:
        broken: set[int] = set()
        while True:
            time.sleep(WATCH_S)
            with self.lock:
                new = set(dead_ranks(self.store_path)) - self.handled - broken
                if new:
                    broken |= new
                    break_connections()

    def recover(self, engine, model, error: BaseException) -> Recovery:
        """After this rank's step failed with `error`: regroup without the dead ranks, move
        their experts, resume `engine`; raises `error` when no rank was marked dead in time. Not
        watched for hangs until regrouped (reading experts may take long): `--timeout` bounds it."""
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
        survivors, dead = self._meet(dead, deadline)
        gone = {i for i, m in enumerate(self.members) if m not in survivors}
        rank = survivors.index(self.original)
        deployment = Deployment(ep=len(survivors))
        group = stage_group(deployment, rank)
        moves, served = reshard(model, group, rank, gone, self.checkpoint, self.seed, self.dtype)
        mine = {seq.request.id: seq.tokens[len(seq.request.prompt):]
                for seq in (*engine.scheduler.running, *engine.scheduler.waiting)}
        everyone: list = [None] * len(survivors)  # also a barrier: the time is the slowest's
        dist.all_gather_object(everyone, (mine, engine.scheduler.stats()))
        engine.resume(rank, deployment, [stats for _, stats in everyone],
                      [i for i in range(len(self.members)) if i not in gone])
        if beat is not None:  # regrouped, experts in place: the next step is watched
            beat.arm()
        lost = {r: how for r, how in dead.items() if r not in self.lost}
        self.lost.update(lost)
        self.members = survivors
        report = Recovery(lost, len(survivors),
                          {layer: {e: survivors[i] for e, i in m.items()} for layer, m in moves.items()},
                          {layer: {e: survivors[i] for e, i in m.items()} for layer, m in served.items()},
                          time.monotonic() - started, {k: v for held, _ in everyone for k, v in held.items()})
        self.recoveries.append(report)
        return report

    def _meet(self, dead: dict[int, str], deadline: float) -> tuple[list[int], dict[int, str]]:
        """Destroy the old groups and form the survivors' default group; (the survivors'
        original ranks, the dead ranks it was formed without)."""
        with self.lock:  # the watch thread breaks no new group's sockets for these ranks
            self.handled |= set(dead)
            dist.destroy_process_group()
        while True:
            survivors = [m for m in self.members if m not in dead]
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
            return survivors, dead
