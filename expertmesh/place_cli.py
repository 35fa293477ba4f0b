"""`expertmesh place`: expert placement from recorded routing (`run --record-routing FILE`).

Two plans: over nodes, to cut the bytes that cross node boundaries (`--gpus-per-node`, for the
flat or hierarchical exchange), or, with `--redundant-experts R`, replicas of the hot experts to
even out the ranks' load. Either is written as a placement file for `run --placement FILE`.
"""

from __future__ import annotations

from rich.console import Console

from expertmesh.config import preset
from expertmesh.deployment import Deployment
from expertmesh.parallel.placement import (balanced_placement, cross_node_rows, default_placement,
                                           expert_loads, load_routing, optimise_placement,
                                           planned_rank_loads, save_placement)
from expertmesh.topology import Topology

console = Console()


def cmd_place(args) -> int:
    """Optimise expert placement from recorded routing statistics."""
    cfg = preset(args.preset)
    dep = Deployment.parse(args.deployment)
    dep.validate(cfg)
    if dep.ep == 1:
        raise ValueError("placement needs an expert-parallel deployment such as ep16")
    topology = Topology.detect(dep.world_size, args.gpus_per_node)
    stats = load_routing(args.routing)
    if len(stats) != cfg.n_layers:
        raise ValueError(f"{args.routing} has {len(stats)} layers, {cfg.name} has {cfg.n_layers}; "
                         f"record it with the same preset")
    start = default_placement(cfg.n_layers, cfg.n_experts, dep.ep)
    if args.redundant_experts:
        best = balanced_placement(stats, cfg, dep.ep, args.redundant_experts)
        loads = [expert_loads(layer, cfg.n_experts) for layer in stats]
        before = max(max(planned_rank_loads(p, l)) for p, l in zip(start, loads))
        after = max(max(planned_rank_loads(p, l)) for p, l in zip(best, loads))
        save_placement(args.out, best, cfg.n_experts)
        console.print(f"busiest rank's planned tokens (worst layer): default {before:,.0f} -> with "
                      f"{args.redundant_experts} redundant experts {after:,.0f} ({_ratio(after, before)}); "
                      f"wrote {args.out}")
        return 0
    hierarchical = args.a2a == "hierarchical"
    best = [optimise_placement(p, layer, topology, hierarchical) for p, layer in zip(start, stats)]
    before = sum(cross_node_rows(p, l, topology, hierarchical) for p, l in zip(start, stats))
    after = sum(cross_node_rows(p, l, topology, hierarchical) for p, l in zip(best, stats))
    save_placement(args.out, best, cfg.n_experts)
    console.print(f"cross-node rows per recorded run ({args.a2a} exchange, {topology.nodes} nodes x "
                  f"{topology.gpus_per_node}): default {before:,} -> optimised {after:,} "
                  f"({_ratio(after, before)}); wrote {args.out}")
    return 0


def _ratio(after: float, before: float) -> str:
    return f"x{after / before:.2f}" if before else "nothing to reduce"


def add_commands(sub) -> None:
    place = sub.add_parser("place", help="optimise expert placement over nodes from recorded routing")
    place.add_argument("--routing", required=True, help="statistics from `run --record-routing`")
    place.add_argument("--preset", default="tiny")
    place.add_argument("--deployment", default="ep16")
    place.add_argument("--gpus-per-node", type=int, default=None)
    place.add_argument("--a2a", default="flat", choices=("flat", "hierarchical"))
    place.add_argument("--out", default="placement.json")
    place.add_argument("--redundant-experts", type=int, default=0,
                       help="plan replicas of hot experts to balance load (instead of node placement)")
    place.set_defaults(func=cmd_place)
