"""Every rank's expert-parallel counters, for `/metrics`: every `STATS_EVERY` steps each rank
sends rank 0 what it counted since the last time (`gather_object` of a `RankCounters` over the
engine's control group, gloo), and rank 0 sums them into one `server/ipc.py: CounterTotals` for
front end 0.
"""

from __future__ import annotations

import torch.distributed as dist

from expertmesh import faults
from expertmesh.engine import counters
from expertmesh.engine.counters import RankCounters
from expertmesh.engine.engine import Engine
from expertmesh.engine.load import load_summary
from expertmesh.model.transformer import MoETransformer
from expertmesh.server.ipc import CounterTotals

STATS_EVERY = 16  # steps between two collections of the ranks' counters


def share_counters(engine: Engine, model: MoETransformer) -> list[RankCounters] | None:
    """Collective: every rank's counters since the last call, which resets them; rank 0 gets the
    list, the others None."""
    mine = counters.take(model, engine.rank)
    mine.eplb = engine.eplb.take() if engine.eplb else None
    if not dist.is_initialized():
        return [mine]
    faults.at_counters(engine.runner.steps, engine.scheduler.has_work)  # test-only; nothing unless asked
    everyone = [None] * dist.get_world_size() if engine.rank == 0 else None
    dist.gather_object(mine, everyone, dst=0, group=engine.group)
    return everyone


def counter_totals(ranks: list[RankCounters], n_experts: int, row_bytes: int, tp: int) -> CounterTotals:
    """The ranks' counters summed: TP peers see the same tokens, so their overflow counts once."""
    per_layer: dict[int, dict[int, list]] = {}
    placements: dict[int, list] = {}
    exchanged = cross = dropped = rerouted = 0
    for i, r in enumerate(ranks):
        for layer, stats in r.exchange.items():
            per_layer.setdefault(layer, {})[len(per_layer.get(layer, {}))] = stats.loads
            placements[layer] = r.placement[layer]
            exchanged += stats.rows_sent * row_bytes
            cross += stats.cross_node_bytes
        if tp > 1 and i % tp:
            continue
        for c in r.overflow.values():
            dropped, rerouted = dropped + c.dropped, rerouted + c.rerouted
    imbalance, experts = None, {}
    if per_layer:
        summary = load_summary(per_layer, placements, n_experts)
        imbalance, experts = summary["imbalance_mean"], summary["tokens_per_expert"]
    taken = [r.eplb for r in ranks if r.eplb is not None]
    return CounterTotals(exchanged, cross, dropped, rerouted, imbalance, experts,
                         eplb_imbalance={layer: x for t in taken for layer, x in t["imbalance"].items()},
                         eplb_rebalances=max((t["rebalances"] for t in taken), default=0),
                         eplb_stalls=[s for t in taken for s in t["stalls"]])
