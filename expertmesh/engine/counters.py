"""A rank's counters, and what a run reports of them over all ranks.

The counters live where they are counted: each expert-parallel dispatcher's `stats` (rows sent,
cross-node bytes, rows its experts computed per call: `parallel/exchange_stats.py`) and `routing`
(which experts its tokens chose, when recorded), and each MoE block's `overflow` (assignments
capacity dropped or rerouted: `model/capacity.py`). This module is the one place that resets and
reads them for the layers a rank holds: `reset(model)` before what is to be counted,
`snapshot(model, rank)` after it, `take` for both at once (a server's periodic collection). The
summaries turn every rank's snapshot into the figures of a run (`RunResult`).
"""

from __future__ import annotations

from collections import Counter
from dataclasses import asdict, dataclass

from expertmesh.deployment import Deployment
from expertmesh.engine.load import load_summary
from expertmesh.model.capacity import Overflow
from expertmesh.model.transformer import MoETransformer
from expertmesh.parallel.exchange_stats import ExchangeStats
from expertmesh.parallel.expert import dispatchers


@dataclass
class RankCounters:
    """One rank's counters, by global layer index. exchange, placement: the expert-parallel
    layers held here (placement[layer][ep_rank] names the expert of each slot, whose rows
    `exchange[layer].loads` counts); overflow: every MoE layer held here; routing: a Counter of
    sorted expert tuples -> tokens per EP layer, when recorded."""

    rank: int
    exchange: dict[int, ExchangeStats]
    placement: dict[int, list[list[int]]]
    overflow: dict[int, Overflow]
    routing: dict[int, Counter] | None = None
    eplb: dict | None = None  # online EPLB's `Eplb.take()`, where a server collects it


def record_routing(model: MoETransformer, on: bool = True) -> None:
    """Count which experts each token chooses, in every EP layer held here, from now on (costs a
    `unique` per call)."""
    for d in dispatchers(model).values():
        d.routing = Counter() if on else None


def reset(model: MoETransformer) -> None:
    """Zero every counter of the layers held here."""
    for d in dispatchers(model).values():
        d.stats.reset()
        if d.routing is not None:
            d.routing.clear()
    for layer in model.layers.values():
        if layer.moe is not None:
            layer.moe.overflow.reset()


def snapshot(model: MoETransformer, rank: int) -> RankCounters:
    """A copy of every counter of the layers held here, on the host."""
    exchange = dispatchers(model)
    routing = {layer: Counter(d.routing) for layer, d in exchange.items() if d.routing is not None}
    return RankCounters(
        rank=rank,
        exchange={layer: d.stats.snapshot() for layer, d in exchange.items()},
        placement={layer: d.placement for layer, d in exchange.items()},
        overflow={int(name): layer.moe.overflow.snapshot() for name, layer in model.layers.items()
                  if layer.moe is not None},
        routing=routing or None,
    )


def take(model: MoETransformer, rank: int) -> RankCounters:
    """The counters since the last reset, which resets them."""
    counters = snapshot(model, rank)
    reset(model)
    return counters


# -- over all ranks ----------------------------------------------------------------------------

def exchange_summary(ranks: list[RankCounters], steps: int) -> dict:
    """Rows and bytes the EP exchange moved, summed over ranks: in all, per layer, per step."""
    per_layer: dict[int, ExchangeStats] = {}
    for r in ranks:
        for layer, stats in r.exchange.items():
            total = per_layer.setdefault(layer, ExchangeStats())
            total.rows_sent += stats.rows_sent
            total.low_latency_calls += stats.low_latency_calls
            total.cross_node_rows += stats.cross_node_rows
            total.cross_node_bytes += stats.cross_node_bytes
    cross = sum(s.cross_node_bytes for s in per_layer.values())
    return {
        "rows_sent": sum(s.rows_sent for s in per_layer.values()),
        "low_latency_calls": sum(s.low_latency_calls for s in per_layer.values()),
        "cross_node_bytes": cross, "cross_node_bytes_per_step": cross / steps,
        "cross_node_bytes_per_layer": {layer: s.cross_node_bytes for layer, s in sorted(per_layer.items())},
    }


def load(ranks: list[RankCounters], deployment: Deployment, n_experts: int) -> dict:
    """Rows per expert and per rank, and the imbalance of each MoE call (`engine/load.py`)."""
    per_layer: dict[int, dict[int, list]] = {}
    placements: dict[int, list] = {}
    for r in ranks:
        ep_rank = deployment.coords(r.rank)[1]
        for layer, stats in r.exchange.items():
            per_layer.setdefault(layer, {})[ep_rank] = stats.loads
            placements[layer] = r.placement[layer]
    return load_summary(per_layer, placements, n_experts)


def overflow_total(ranks: list[RankCounters], deployment: Deployment) -> dict:
    """Assignments capacity looked at, rerouted and dropped, over all ranks (each token counted
    once: TP ranks all see every token, so only the first of each TP group reports)."""
    total = Overflow()
    for r in ranks:
        if deployment.tp > 1 and deployment.coords(r.rank)[1] != 0:
            continue
        for counts in r.overflow.values():
            total.assignments += counts.assignments
            total.rerouted += counts.rerouted
            total.dropped += counts.dropped
    return asdict(total)


def routing_by_rank(ranks: list[RankCounters], deployment: Deployment, n_layers: int) -> list[dict]:
    """[layer]{source EP rank: Counter(expert tuple -> tokens)}."""
    layers: list[dict] = [{} for _ in range(n_layers)]
    for r in ranks:
        ep_rank = deployment.coords(r.rank)[1]
        for layer, counter in (r.routing or {}).items():
            layers[layer].setdefault(ep_rank, Counter()).update(counter)
    return layers
