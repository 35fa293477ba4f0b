"""Online EPLB's planner: from one layer's load window, the experts its spare slots should hold.

Each EP rank keeps its primary experts (the start-up placement's first slots, never moved) and
`spares` more slots, the last ones of its placement row, that online rebalancing refills. The plan
(`fill_spares`) fills them one at a time, greedily: each spare slot goes to the (expert, rank)
pair that leaves the busiest rank least loaded, counting an expert's tokens where the engine's
static slot table sends them (`rank_loads`: a source's own replica, else one by source rank; the
packer `plan_redundant` assumes an even split, which the table does not give: measured on the
eplb benchmark, planning with it left the busiest rank about 15% more than predicted); ties go to
the lower sum of squared rank loads, then the lower expert and rank. This is `plan_redundant`'s
candidate (b) with a limit of slots per rank: only spare slots change, so a rebalance moves at
most `spares` experts per rank and layer. An expert that stays on a rank keeps its slot (`align`), so it moves
no weight.

`plan_layer` adopts the plan only when it lowers the window's max / mean rank load by `MARGIN`
of the current placement's (both predicted by `rank_loads` from the same window): a
rebalance costs weight moves, so noise must not trigger one.
"""

from __future__ import annotations

from expertmesh.parallel.placement import Placement

# Adopt a new placement when it lowers the window's predicted max/mean rank load by at least this
# fraction (10%: the 1.8x -> 1.6x of a mild skew is worth a move; per-window noise of a steady
# load is below it).
MARGIN = 0.10


def _routed(where: list[int], load: float, P: int) -> list[float]:
    """One expert's rows per rank when its holders are `where` (rank order): see `rank_loads`."""
    out = [0.0] * P
    for source in range(P):
        out[source if source in where else where[source % len(where)]] += load / P
    return out


def rank_loads(placement: Placement, loads: list[float]) -> list[float]:
    """Rows per rank under `loads` (per expert) when each source rank sends 1/P of every expert's
    tokens where the engine's static slot table does (`placement.slot_table`, one node): to its
    own replica, else to holder number `source % holders` in rank order. Not an even split: with
    holders 0, 1, 3 of an expert, rank 3 gets its own sources' share and source 2's."""
    P = len(placement)
    out = [0.0] * P
    for e, where in _holders(placement).items():
        out = [a + b for a, b in zip(out, _routed(where, loads[e], P))]
    return out


def _holders(placement: Placement) -> dict[int, list[int]]:
    held: dict[int, list[int]] = {}
    for r, experts in enumerate(placement):
        for e in experts:
            held.setdefault(e, []).append(r)
    return held


def imbalance(placement: Placement, loads: list[float]) -> float:
    """Predicted max / mean rank load of `placement` under expert `loads` (1.0: none or even)."""
    ranks = rank_loads(placement, loads)
    mean = sum(ranks) / len(ranks)
    return max(ranks) / mean if mean else 1.0


def fill_spares(primaries: Placement, spares: int, loads: list[float]) -> list[list[int]]:
    """primaries[r]: the experts rank r keeps -> the experts of each rank's `spares` spare slots
    (a set per rank, unordered; see the module docstring). Every slot is filled, also when no
    replica lowers the busiest rank (then the least harmful one). A trial changes one expert's
    rows only: O(spare slots x E x P) trials of O(P) each."""
    P = len(primaries)
    held = _holders(primaries)
    routed = {e: _routed(where, loads[e], P) for e, where in held.items()}
    ranks = [sum(rows[r] for rows in routed.values()) for r in range(P)]
    chosen: list[list[int]] = [[] for _ in range(P)]
    for _ in range(spares * P):
        best = None
        for e, where in held.items():
            for r in range(P):
                if len(chosen[r]) == spares or r in where:
                    continue
                rows = _routed(sorted(where + [r]), loads[e], P)
                trial = [x - old + new for x, old, new in zip(ranks, routed[e], rows)]
                key = (max(trial), sum(x * x for x in trial), e, r)
                if best is None or key < best[0]:
                    best = (key, trial, rows)
        if best is None:  # more spare slots than distinct experts: nothing left to place
            break
        (_, _, e, r), ranks, routed[e] = best
        held[e] = sorted(held[e] + [r])
        chosen[r].append(e)
    return chosen


def align(current: list[int], chosen: list[int]) -> list[int]:
    """Order `chosen` spare experts so that those already in `current` (the spare slots' experts
    now) keep their slot: -> the new spare row, slot by slot."""
    keep = [e if e in chosen else None for e in current]
    rest = iter(e for e in chosen if e not in current)
    return [e if e is not None else next(rest) for e in keep]


def plan_layer(current: Placement, primaries: int, loads: list[float],
               margin: float = MARGIN) -> Placement | None:
    """current[r]: rank r's experts now, its first `primaries` slots fixed, the rest spare;
    loads: the window's rows per expert -> the new placement, or None when it does not lower the
    predicted imbalance by `margin` (relative)."""
    fixed = [experts[:primaries] for experts in current]
    spares = len(current[0]) - primaries
    if spares <= 0 or not sum(loads):
        return None
    chosen = fill_spares(fixed, spares, loads)
    new = [fixed[r] + align(current[r][primaries:], chosen[r]) for r in range(len(current))]
    if new == current or imbalance(new, loads) > imbalance(current, loads) * (1 - margin):
        return None
    return new


def eplb_start(cfg, ep: int, spares: int, loads: list[list[int]] | None = None) -> list[Placement]:
    """Every layer's start placement for online rebalancing: the plain one with `spares` slots per
    rank, filled from recorded routing's expert loads per layer when given (`fill_spares`), else
    by `start_placement`."""
    plain = start_placement(cfg.n_experts, ep, spares)
    if loads is None:
        return [plain for _ in range(cfg.n_layers)]
    primaries = [row[:cfg.n_experts // ep] for row in plain]
    if len(loads) != cfg.n_layers:
        raise ValueError(f"routing statistics have {len(loads)} layers, {cfg.name} has {cfg.n_layers}; "
                         f"record them with the same model")
    return [[p + align(row[len(p):], chosen) for p, row, chosen in
             zip(primaries, plain, fill_spares(primaries, spares, layer))] for layer in loads]


def start_placement(n_experts: int, ep: int, spares: int) -> Placement:
    """The plain placement (rank r holds experts r*E/P .. (r+1)*E/P - 1) with `spares` more
    slots per rank, filled before any load is known: spare j of rank r holds an expert of rank
    r + 1 + j (mod P; a further one once every other rank has given one)."""
    per = n_experts // ep
    if spares > n_experts - per:
        raise ValueError(f"--redundant-experts {spares} spare slots per rank exceed the {n_experts - per} "
                         f"experts another rank holds; use at most that")
    rows = []
    for r in range(ep):
        spare = []
        for j in range(spares):
            other = (r + 1 + j % (ep - 1)) % ep
            spare.append(other * per + j // (ep - 1))
        rows.append(list(range(r * per, (r + 1) * per)) + spare)
    return rows
