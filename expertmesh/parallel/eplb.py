"""Online expert load balancing (EPLB): the controller each rank runs beside its engine.

Every `interval` (K) engine steps, over the last `window` (W) of them:

  1. load window: each EP layer held here counts the rows its experts compute per expert `[E]`
     on the device (`ExchangeStats.count_window`, device ops only); the window is zeroed at its
     first step and read on the host once, at its last step (one read of all layers together);
  2. the step's existing all-gather of outputs (`engine.py`) carries each rank's window
     (`{layer: [E] ints}`, about E * 8 bytes per layer held, on that one step only), so every rank
     has every rank's: no collective of its own;
  3. every rank of a layer's EP group plans that layer from the same numbers (`eplb_plan.py`), so
     all agree without a message, at most `layers_per_step` layers a step from the window's end
     (a plan costs milliseconds of Python); an adopted plan queues a `LayerMove` (`expert_moves.py`);
  4. at each step's start, the moves posted at the previous step finish (wait, copy the staged
     weights into their slots, switch the slot table), then at most `layers_per_step` (L) queued
     layers post their copies, which run while this step computes with the old placement.

The engine calls `begin_step` before its forward, `payload` for the gather, `end_step` with
everyone's payloads after it, and `close` when it stops. Every rank makes the same calls at the
same steps, so every rank of a group switches a layer at the same step boundary.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch
import torch.distributed as dist

from expertmesh.deployment import Deployment
from expertmesh.model.transformer import MoETransformer
from expertmesh.parallel.eplb_plan import MARGIN, imbalance, plan_layer
from expertmesh.parallel.expert import dispatchers
from expertmesh.parallel.expert_moves import LayerMove
from expertmesh.parallel.mesh import new_group

# Default interval and window (steps) when `--eplb-interval` is given without a value.
INTERVAL, WINDOW = 1000, 500


@dataclass(frozen=True)
class EplbConfig:
    """interval K, window W (the last W steps of each K), layers_per_step L, margin (`eplb_plan`)."""

    interval: int = INTERVAL
    window: int = WINDOW
    layers_per_step: int = 1
    margin: float = MARGIN

    def validate(self) -> None:
        if self.interval < 1:
            raise ValueError(f"--eplb-interval {self.interval} must be at least 1 step")
        if not 1 <= self.window <= self.interval:
            raise ValueError(f"--eplb-window {self.window} must be between 1 and --eplb-interval "
                             f"{self.interval} steps")
        if self.layers_per_step < 1:
            raise ValueError(f"--eplb-layers-per-step {self.layers_per_step} must be at least 1")


def move_group(deployment: Deployment, rank: int) -> dist.ProcessGroup:
    """The group this rank's weight moves go over: its stage's EP ranks, a group apart from the
    exchange's. Collective: every rank makes every stage's, in order."""
    mine = None
    for stage in range(deployment.pp):
        ranks = list(range(stage * deployment.inner, (stage + 1) * deployment.inner))
        group = new_group(ranks)
        if rank in ranks:
            mine = group
    return mine


class Eplb:
    """This rank's controller (see the module docstring). primaries: the slots of each rank that
    never move (the start placement's first ones, `eplb_plan.plan_layer`)."""

    def __init__(self, model: MoETransformer, config: EplbConfig, primaries: int, group: dist.ProcessGroup):
        self.config, self.primaries, self.group = config, primaries, group
        self.layers = {i: model.layers[str(i)].moe for i in dispatchers(model)}
        for block in self.layers.values():
            stats, device = block.dispatcher.stats, block.experts.w_up.device
            stats.window_experts = torch.tensor(block.dispatcher.placement[block.dispatcher.rank], device=device)
        self.step = 0
        self.queued: dict[int, list[list[int]]] = {}  # layer -> placement, in planning order
        self.to_plan: list[tuple] = []  # (window, layer, loads, measured) of the last window
        self.posted: list[LayerMove] = []
        self.stalls: list[float] = []  # seconds each step spent on EPLB (plan, wait, switch, post)
        self.windows: list[float] = []  # per window: mean over layers of its measured imbalance
        self.adopted: list[tuple[int, int, float, float]] = []  # (window, layer, before, after)
        self.busy_steps: list[int] = []  # steps that planned, finished or posted a move
        self.switches = 0
        self.bytes_received = 0
        self._spent, self._busy = 0.0, False
        self.latest: dict[int, float] = {}  # layer -> the last window's measured imbalance
        self.untaken: dict = {"rebalances": 0, "stalls": []}  # since the last `take`

    # -- the engine's calls, in step order ---------------------------------------------------

    def begin_step(self) -> None:
        """Before the forward: finish last step's moves, post the next ones, open the window."""
        start = time.perf_counter()
        self._busy = bool(self.posted or self.queued)
        for move in self.posted:
            move.finish()
            self.switches += 1
            self.bytes_received += move.bytes_received
        self.posted = []
        for layer in list(self.queued)[:self.config.layers_per_step]:
            move = LayerMove(layer, self.layers[layer], self.queued.pop(layer), self.group)
            move.post()
            self.posted.append(move)
        K, W = self.config.interval, self.config.window
        if self.step % K == K - W:
            for block in self.layers.values():
                stats = block.dispatcher.stats
                stats.window = torch.zeros(len(block.router.weight), dtype=torch.long,
                                           device=stats.window_experts.device)
        self._spent = time.perf_counter() - start

    def payload(self) -> dict[int, list[int]] | None:
        """After the forward: at a window's last step, this rank's window per layer held (one
        host read of all of them), closing it; else None."""
        K = self.config.interval
        if self.step % K != K - 1 or not self.layers:
            return None
        layers = list(self.layers)
        windows = [self.layers[i].dispatcher.stats.window for i in layers]
        rows = torch.stack(windows).tolist()  # the window's one host read
        for i in layers:
            self.layers[i].dispatcher.stats.window = None
        return dict(zip(layers, rows))

    def end_step(self, payloads: list) -> None:
        """After the gather, with every rank's payload: measure the window if one closed; plan
        at most `layers_per_step` of its layers."""
        start = time.perf_counter()
        if any(p is not None for p in payloads):
            self._measure([p for p in payloads if p is not None])
        self._busy = self._busy or bool(self.to_plan)
        for item in self.to_plan[:self.config.layers_per_step]:  # planning spread like the moves
            self._plan(*item)
        del self.to_plan[:self.config.layers_per_step]
        self.stalls.append(self._spent + time.perf_counter() - start)
        if self._busy:
            self.untaken["stalls"].append(self.stalls[-1])
            self.busy_steps.append(self.step)
        self.step += 1

    def close(self) -> None:
        """The engine stops: finish the moves in flight (drops those not posted)."""
        for move in self.posted:
            move.finish()
        self.posted, self.queued, self.to_plan = [], {}, []

    # -- planning and the run's summary ------------------------------------------------------

    def _measure(self, payloads: list[dict[int, list[int]]]) -> None:
        """A window closed: its imbalance per layer, and every layer held here queued to plan."""
        window = self.step // self.config.interval
        measured = []
        self.to_plan = []
        for layer in self.layers:
            per_rank = [p[layer] for p in payloads if layer in p]  # this layer's EP group
            loads = [sum(rows[e] for rows in per_rank) for e in range(len(per_rank[0]))]
            ranks = [sum(rows) for rows in per_rank]
            mean = sum(ranks) / len(ranks)
            measured.append(max(ranks) / mean if mean else 1.0)
            self.latest[layer] = measured[-1]
            self.to_plan.append((window, layer, loads, measured[-1]))
        self.windows.append(sum(measured) / len(measured) if measured else 1.0)

    def _plan(self, window: int, layer: int, loads: list[int], measured: float) -> None:
        """Plan one layer from its window's loads; queue its move if adopted."""
        current = self.queued.get(layer, self.layers[layer].dispatcher.placement)
        new = plan_layer(current, self.primaries, loads, self.config.margin)
        if new is not None:
            self.queued[layer] = new
            if all(w != window for w, *_ in self.adopted):
                self.untaken["rebalances"] += 1
            self.adopted.append((window, layer, measured, imbalance(new, loads)))

    def take(self) -> dict:
        """For a server's periodic collection: the last window's measured imbalance per layer
        held here, windows that adopted a plan and the seconds of each step that did EPLB work
        (plan, wait, switch, post), since the last call."""
        taken = {"imbalance": dict(self.latest), **self.untaken}
        self.untaken = {"rebalances": 0, "stalls": []}
        return taken

    def summary(self) -> dict:
        """This rank's figures: windows' measured imbalance, adopted plans (window, layer,
        measured imbalance before, predicted after), layer switches, bytes received, the
        seconds each step spent on EPLB, the steps that did EPLB work."""
        return {"windows": self.windows, "adopted": self.adopted, "switches": self.switches,
                "bytes_received": self.bytes_received, "stalls": self.stalls, "busy_steps": self.busy_steps}


def run_summary(ranks: list[dict]) -> dict:
    """Every rank's `summary` -> the run's `eplb` figures: rebalances (windows that adopted a new
    placement for some layer), imbalance_before / imbalance_after (the mean over adopted layer
    plans of the window's measured max/mean rank rows, and of the new placement's predicted one
    under the same window), the mean measured imbalance of each window, the most seconds a step
    spent on EPLB on any rank, layer switches and bytes moved over all ranks."""
    adopted = {(w, layer): (before, after) for r in ranks for w, layer, before, after in r["adopted"]}
    n = min((len(r["windows"]) for r in ranks), default=0)  # every rank closes the same windows
    windows = [sum(r["windows"][i] for r in ranks) / len(ranks) for i in range(n)]
    stalls = [s for r in ranks for s in r["stalls"]]
    return {
        "rebalances": len({w for w, _ in adopted}),
        "imbalance_before": sum(b for b, _ in adopted.values()) / len(adopted) if adopted else None,
        "imbalance_after": sum(a for _, a in adopted.values()) / len(adopted) if adopted else None,
        "window_imbalance": windows,
        "max_step_stall_s": max(stalls, default=0.0),
        "layer_switches": sum(r["switches"] for r in ranks),
        "bytes_moved": sum(r["bytes_received"] for r in ranks),
    }
