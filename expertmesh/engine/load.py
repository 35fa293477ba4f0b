"""Expert load of a run: tokens per expert and per rank, and how uneven the ranks are.

With one expert per GPU a popular expert means a busy GPU that every other GPU waits for, so the
number that matters is the imbalance of a MoE call: max rank load / mean rank load (1.0 is
perfect; P means one rank of P does everything). Loads are the rows each rank's experts computed,
counted by the expert-parallel dispatcher in every call.
"""

from __future__ import annotations

import statistics


def load_summary(per_layer: dict[int, dict[int, list[list[int]]]],
                 placements: list[list[list[int]]], n_experts: int) -> dict:
    """per_layer[layer][ep_rank] = rows per local slot, one list per call -> summary.

    placements[layer][ep_rank] names the expert of each local slot (replicas add up).
    """
    imbalance_per_layer, worst = {}, 1.0
    tokens_per_rank: dict[int, int] = {}
    tokens_per_expert: dict[int, list[int]] = {}
    for layer, by_rank in sorted(per_layer.items()):
        ranks = sorted(by_rank)
        calls = len(by_rank[ranks[0]])
        ratios = []
        for c in range(calls):
            loads = [sum(by_rank[r][c]) for r in ranks]
            if sum(loads):
                ratios.append(max(loads) / statistics.mean(loads))
        imbalance_per_layer[layer] = statistics.mean(ratios) if ratios else 1.0
        worst = max([worst, *ratios])
        experts = [0] * n_experts
        for r in ranks:
            per_slot = [sum(call[i] for call in by_rank[r]) for i in range(len(placements[layer][r]))]
            tokens_per_rank[r] = tokens_per_rank.get(r, 0) + sum(per_slot)
            for expert, n in zip(placements[layer][r], per_slot):
                experts[expert] += n
        tokens_per_expert[layer] = experts
    return {
        "imbalance_mean": statistics.mean(imbalance_per_layer.values()) if imbalance_per_layer else 1.0,
        "imbalance_max": worst,
        "imbalance_per_layer": imbalance_per_layer,
        "tokens_per_rank": [tokens_per_rank[r] for r in sorted(tokens_per_rank)],
        "tokens_per_expert": tokens_per_expert,
    }

