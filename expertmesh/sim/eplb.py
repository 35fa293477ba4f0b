"""The simulator's model of online expert load balancing (`parallel/eplb.py`), step by step.

Per engine step, every MoE layer routes the expected shares of `Routing` (zipf:S), rotated as
`--router-skew zipf:S,shift:N` rotates them (`model/moe.py: rotate_skew`: every N steps by E / 4
experts). A layer's imbalance is the planner's prediction, max / mean rank load with an expert's
tokens split evenly over its replicas (`eplb_plan.imbalance`); the engine measures rows instead,
which add sampling noise of a finite batch to this expectation.

Static: the start-up placement (`eplb_plan.start_placement`) all the way. Online: at the last
step of every window the engine's planner runs on the window's mean shares (`plan_layer`, its
margin), and the layers switch one step after their copies are posted, at most L a step, as the
controller does. Every layer routes alike here, so they plan alike.

Cost of a move: each changed slot receives one expert's weights (`expert_bytes`), point to point
from a holder, over NVLink inside a node, else the network (`HardwareProfile`); a rank's copies
of one layer take `bytes / bandwidth + latency`, hidden behind the step they overlap unless
they take longer than it (`stall_s`, given the step time).
"""

from __future__ import annotations

from dataclasses import dataclass

from expertmesh.parallel.eplb_plan import MARGIN, imbalance, plan_layer, start_placement
from expertmesh.sim.hardware import HardwareProfile
from expertmesh.sim.routing import Routing


@dataclass(frozen=True)
class EplbScenario:
    n_experts: int
    top_k: int
    ep: int
    spares: int
    routing: Routing
    shift: int            # steps between rotations of the hot experts (0: never)
    interval: int
    window: int
    layers: int           # MoE layers (each moves once per adopted plan)
    layers_per_step: int = 1
    margin: float = MARGIN


def shares_at(s: EplbScenario, step: int) -> list[float]:
    """Expected assignment share per expert at `step` (the engine's rotation)."""
    base = s.routing.shares(s.n_experts, s.top_k)
    offset = (step // s.shift) * max(1, s.n_experts // 4) % s.n_experts if s.shift else 0
    return [base[(e - offset) % s.n_experts] for e in range(s.n_experts)]


def simulate_eplb(s: EplbScenario, steps: int) -> dict:
    """-> mean imbalance per step without and with online rebalancing, plans adopted, slots that
    received an expert per adopted plan (most on one rank), and the imbalance per step."""
    start = start_placement(s.n_experts, s.ep, s.spares)
    per = s.n_experts // s.ep
    current, target = start, None
    moved_layers, pending_since = s.layers, None  # all layers on `current` until a plan is adopted
    static, online, adopted, received = [], [], 0, []
    for step in range(steps):
        shares = shares_at(s, step)
        static.append(imbalance(start, shares))
        if target is not None and pending_since is not None:  # L layers switch per step, a step after posting
            moved_layers = min(s.layers, (step - pending_since) * s.layers_per_step)
            if moved_layers == s.layers:
                current, target, pending_since = target, None, None
        mixed = imbalance(current, shares) if target is None else (
            (moved_layers * imbalance(target, shares) + (s.layers - moved_layers) * imbalance(current, shares)) / s.layers)
        online.append(mixed)
        if step % s.interval == s.interval - 1 and target is None:
            window = [shares_at(s, t) for t in range(step - s.window + 1, step + 1)]
            loads = [sum(w[e] for w in window) / len(window) for e in range(s.n_experts)]
            new = plan_layer(current, per, loads, s.margin)
            if new is not None:
                adopted += 1
                target, pending_since, moved_layers = new, step + 1, 0
                received.append(max(sum(a != b for a, b in zip(old, fresh)) for old, fresh in zip(current, new)))
    return {"imbalance_static": sum(static) / steps, "imbalance_online": sum(online) / steps,
            "rebalances": adopted, "max_slots_received_per_layer": max(received, default=0),
            "static_per_step": static, "online_per_step": online}


def move_cost(hw: HardwareProfile, expert_bytes: int, slots: int, ep: int, step_s: float | None = None) -> dict:
    """The copies of one layer on the busiest receiver: `slots` experts of `expert_bytes`; over
    NVLink when the EP group fits one node, else the network. stall_s: what a step of `step_s`
    does not hide (None without a step time)."""
    inside = ep <= hw.gpus_per_node
    bandwidth = hw.nvlink_bw * hw.nvlink_efficiency if inside else hw.net_bw * hw.net_efficiency
    latency = hw.nvlink_latency_s if inside else hw.net_latency_s
    seconds = slots * expert_bytes / bandwidth + (latency if slots else 0.0)
    return {"bytes": slots * expert_bytes, "link": "nvlink" if inside else "network", "copy_s": seconds,
            "stall_s": None if step_s is None else max(0.0, seconds - step_s)}
