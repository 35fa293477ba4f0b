"""Which EP rank holds which expert, per layer: default, optimised from routing statistics, on disk;
and, for the dispatcher, the slot table that sends each expert's tokens to one of its holders.

Routing statistics come from a calibration run (`expertmesh run --record-routing FILE`): per
layer, how many tokens of each source rank chose each set of k experts. From them the cross-node
rows of a placement follow: the flat exchange moves one row per assignment whose expert is on
another node than its token; the hierarchical one moves one row per (token, remote node holding
one of its experts). `optimise_placement` swaps experts between nodes while that count drops, so
it never does worse than the placement it starts from. Placement inside a node does not change
cross-node traffic, and outputs are identical under any placement.

File format (JSON): {"n_experts": E, "ep": P, "layers": [[[experts of rank 0], ...], ...]}.
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import torch

from expertmesh.topology import Topology

Placement = list[list[int]]                       # placement[rank] = experts, in local order
RoutingStats = list[dict[int, Counter]]            # [layer][source rank][expert tuple] = tokens


def holders(placement: Placement) -> dict[int, list[tuple[int, int]]]:
    """expert -> [(rank, slot)] of each of its replicas; slots number placement's (rank, local
    expert) pairs rank by rank."""
    out: dict[int, list[tuple[int, int]]] = {}
    slot = 0
    for rank, experts in enumerate(placement):
        for expert in experts:
            out.setdefault(expert, []).append((rank, slot))
            slot += 1
    return out


def slot_table(placement: list[list[int]], n_experts: int, source: int = 0,
               peer_nodes: list[int] | None = None) -> torch.Tensor:
    """The slot each expert's tokens from rank `source` go to `[E]`.

    placement[r] lists the experts rank r holds, in local order; slots number them rank by rank.
    An expert with replicas (redundant experts) is served, for this source, by the replica on
    the source rank itself, else by one of those on its node (else of all), chosen by
    `source % count`, so that traffic stays local where it can and spreads over the replicas.
    """
    nodes = peer_nodes or [0] * len(placement)
    table = torch.full((n_experts,), -1, dtype=torch.long)
    for expert, replicas in holders(placement).items():
        same_rank = [s for r, s in replicas if r == source]
        same_node = [s for r, s in replicas if nodes[r] == nodes[source]]
        candidates = same_node or [s for _, s in replicas]
        table[expert] = same_rank[0] if same_rank else candidates[source % len(candidates)]
    return table


def contiguous_placement(n_experts: int, ep: int) -> list[list[int]]:
    """Rank r holds experts r*E/P .. (r+1)*E/P - 1."""
    per = n_experts // ep
    return [list(range(r * per, (r + 1) * per)) for r in range(ep)]


def cross_node_rows(placement: Placement, stats_layer: dict[int, Counter], topology: Topology,
                    hierarchical: bool) -> int:
    """Rows one layer's dispatch sends across node boundaries (the return sends as many)."""
    node_of_expert = {e: topology.node_of(r) for r, experts in enumerate(placement) for e in experts}
    rows = 0
    for source, choices in stats_layer.items():
        home = topology.node_of(source)
        for experts, tokens in choices.items():
            remote = [node_of_expert[e] for e in experts if node_of_expert[e] != home]
            rows += tokens * (len(set(remote)) if hierarchical else len(remote))
    return rows


def optimise_placement(start: Placement, stats_layer: dict[int, Counter], topology: Topology,
                       hierarchical: bool) -> Placement:
    """Greedy pairwise swaps of experts on different nodes while cross-node rows decrease."""
    best = [list(experts) for experts in start]
    best_cost = cross_node_rows(best, stats_layer, topology, hierarchical)
    improved = True
    while improved:
        improved = False
        for r1 in range(len(best)):
            for r2 in range(r1 + 1, len(best)):
                if topology.node_of(r1) == topology.node_of(r2):
                    continue
                for i in range(len(best[r1])):
                    for j in range(len(best[r2])):
                        trial = [list(experts) for experts in best]
                        trial[r1][i], trial[r2][j] = best[r2][j], best[r1][i]
                        cost = cross_node_rows(trial, stats_layer, topology, hierarchical)
                        if cost < best_cost:
                            best, best_cost, improved = trial, cost, True
    return best


def validate_placement(layers: list[Placement], n_layers: int, n_experts: int, ep: int) -> None:
    """Every layer places every expert at least once (more: replicas), on the deployment's ranks,
    never twice on one rank, and every rank holds at least one expert."""
    if len(layers) != n_layers:
        raise ValueError(f"placement has {len(layers)} layers, the model has {n_layers}; "
                         f"make a placement for this model")
    for i, placement in enumerate(layers):
        if len(placement) != ep:
            raise ValueError(f"placement layer {i} covers {len(placement)} ranks, the deployment "
                             f"has ep={ep}; make a placement for this deployment")
        held = {e for experts in placement for e in experts}
        if held != set(range(n_experts)) or any(len(set(x)) != len(x) or not x for x in placement):
            raise ValueError(f"placement layer {i} must hold each of the {n_experts} experts at "
                             f"least once and no expert twice on one rank")


def planned_rank_loads(placement: Placement, loads: list[float]) -> list[float]:
    """Load of each rank if each expert's tokens split evenly over its replicas."""
    replicas = Counter(e for experts in placement for e in experts)
    return [sum(loads[e] / replicas[e] for e in experts) for experts in placement]


def plan_redundant(loads: list[float], ep: int, redundant: int) -> Placement:
    """At most `redundant` extra expert slots, chosen to lower the busiest rank's planned load:
    the better of `contiguous_plus_replicas` and `replicate_then_pack` (the first on a tie, and
    the only one when packing fails). The first never raises the busiest rank's load, so neither
    does the plan."""
    candidates = [contiguous_plus_replicas(loads, ep, redundant), replicate_then_pack(loads, ep, redundant)]
    return min((p for p in candidates if p is not None), key=lambda p: max(planned_rank_loads(p, loads)))


def replicate_then_pack(loads: list[float], ep: int, redundant: int) -> Placement | None:
    """EPLB-style: give the hottest expert (by load per replica) one more replica, `redundant`
    times, then pack every replica onto a rank, those of experts with more replicas first (they
    need distinct ranks), then heaviest first, each to the least loaded rank with room that does
    not hold that expert yet; ranks hold E + redundant slots as evenly as they can. None when
    packing paints itself into a corner (no such rank)."""
    E = len(loads)
    redundant = min(redundant, E * (ep - 1))  # an expert has at most one replica per rank
    replicas = [1] * E
    for _ in range(redundant):
        hottest = max((e for e in range(E) if replicas[e] < ep), key=lambda e: loads[e] / replicas[e])
        replicas[hottest] += 1
    n_slots = E + redundant
    room = [n_slots // ep + (1 if r < n_slots % ep else 0) for r in range(ep)]
    packed: Placement = [[] for _ in range(ep)]
    rank_load = [0.0] * ep
    for _, load, e in sorted(((replicas[e], loads[e] / replicas[e], e) for e in range(E)
                              for _ in range(replicas[e])), reverse=True):
        free = [r for r in range(ep) if room[r] and e not in packed[r]]
        if not free:
            return None
        r = min(free, key=lambda r: (rank_load[r], -room[r]))
        packed[r].append(e)
        room[r] -= 1
        rank_load[r] += load
    return [sorted(x) for x in packed]


def contiguous_plus_replicas(loads: list[float], ep: int, redundant: int) -> Placement:
    """The contiguous placement, then up to `redundant` times the one replica (of the hottest
    expert that has one that helps, on the rank where it helps most) that lowers the busiest
    rank's planned load; it stops when none does, so it never raises that load."""
    placement = contiguous_placement(len(loads), ep)
    for _ in range(redundant):
        current = max(planned_rank_loads(placement, loads))
        best = None
        for e in sorted(range(len(loads)), key=lambda e: -loads[e]):
            for r in range(ep):
                if e in placement[r]:
                    continue
                trial = [list(x) for x in placement]
                trial[r].append(e)
                peak = max(planned_rank_loads(trial, loads))
                if peak < current and (best is None or peak < best[0]):
                    best = (peak, trial)
            if best:
                break
        if best is None:
            break
        placement = best[1]
    return placement


def expert_loads(routing_layer: dict[int, Counter], n_experts: int) -> list[int]:
    """Recorded routing of one layer ({source: Counter(expert tuple -> tokens)}) -> tokens per expert."""
    loads = [0] * n_experts
    for choices in routing_layer.values():
        for experts, tokens in choices.items():
            for e in experts:
                loads[e] += tokens
    return loads


def balanced_placement(stats: RoutingStats, cfg, ep: int, redundant: int) -> list[Placement]:
    """Per layer, `plan_redundant` on the expert loads of recorded routing `stats`."""
    if len(stats) != cfg.n_layers:
        raise ValueError(f"routing statistics have {len(stats)} layers, {cfg.name} has "
                         f"{cfg.n_layers}; record them with the same model")
    return [plan_redundant(expert_loads(layer, cfg.n_experts), ep, redundant) for layer in stats]


def save_placement(path: str | Path, layers: list[Placement], n_experts: int) -> None:
    Path(path).write_text(json.dumps({"n_experts": n_experts, "ep": len(layers[0]), "layers": layers}))


def load_placement(path: str | Path, n_layers: int, n_experts: int, ep: int) -> list[Placement]:
    try:
        data = json.loads(Path(path).read_text())
        layers = [[[int(e) for e in experts] for experts in layer] for layer in data["layers"]]
    except FileNotFoundError:
        raise ValueError(f"placement file {path} does not exist") from None
    except (ValueError, KeyError, TypeError):
        raise ValueError(f"placement file {path} is not a placement (JSON with a 'layers' list "
                         f"of experts per rank); write it with `expertmesh place`") from None
    validate_placement(layers, n_layers, n_experts, ep)
    return layers


def default_placement(n_layers: int, n_experts: int, ep: int) -> list[Placement]:
    return [contiguous_placement(n_experts, ep) for _ in range(n_layers)]


def save_routing(path: str | Path, stats: RoutingStats) -> None:
    """Routing statistics as JSON: [layer]{source rank: [[experts..., tokens], ...]}."""
    data = [{str(src): [[*experts, n] for experts, n in sorted(c.items())] for src, c in layer.items()}
            for layer in stats]
    Path(path).write_text(json.dumps({"layers": data}))


def load_routing(path: str | Path) -> RoutingStats:
    try:
        data = json.loads(Path(path).read_text())["layers"]
        return [{int(src): Counter({tuple(row[:-1]): row[-1] for row in rows}) for src, rows in layer.items()}
                for layer in data]
    except FileNotFoundError:
        raise ValueError(f"routing statistics file {path} does not exist") from None
    except (ValueError, KeyError, TypeError, AttributeError):
        raise ValueError(f"{path} is not a routing statistics file; record one with "
                         f"`expertmesh run --record-routing FILE`") from None
