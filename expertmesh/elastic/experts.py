"""Where a dead rank's experts go, and their weights on their new holders.

`spare_placement` is the placement `serve --elastic --redundant-experts R` starts from: the
default contiguous one, plus R replicas laid out so that a rank's loss leaves some of its experts
served: rank r's spare slots hold the first experts of rank r+1, round-robin over the ranks.

`survivor_placement` takes one layer's placement over the old group and the dead ranks' indices
in it: each survivor keeps its experts in their slots (the weights stay where they are); an
expert with no surviving holder (no replica) goes to the survivor holding the fewest slots
(lowest index on ties), appended after its slots. Every rank computes it alike.

`reshard` applies the new placements to a model: per EP layer, a survivor keeps its weights
`[El_old, ...]` and appends those of the experts it newly holds `[El_new - El_old, ...]`, read
from the checkpoint's safetensors (only those experts' rows: `checkpoint/loader.py` reads a
shard's slices) or generated from the preset's seed (`model/synthetic.py`, the same values the
single-device reference has); nothing crosses the network. The layer then gets a new
`AllToAllDispatcher` over the new EP group.
"""

from __future__ import annotations

import torch
from torch import nn

from expertmesh.checkpoint.loader import load_checkpoint
from expertmesh.model.moe import GroupedExperts
from expertmesh.model.synthetic import mark_shard, materialize
from expertmesh.model.transformer import MoETransformer
from expertmesh.parallel.dispatch import AllToAllDispatcher
from expertmesh.parallel.expert import dispatchers
from expertmesh.parallel.placement import Placement, contiguous_placement


def spare_placement(n_experts: int, ep: int, redundant: int) -> Placement:
    """`contiguous_placement` plus `redundant` replicas: spare slot i goes to rank i % ep and
    holds the (i // ep)-th expert of the next rank, so a rank's loss leaves its first
    `ceil(redundant / ep)` experts served. ValueError when a rank would hold a copy twice."""
    placement = contiguous_placement(n_experts, ep)
    base = [list(experts) for experts in placement]
    for i in range(redundant):
        rank, depth = i % ep, i // ep
        donor = base[(rank + 1) % ep]
        if ep < 2 or depth >= len(donor):
            raise ValueError(f"--redundant-experts {redundant}: ep{ep} ranks of "
                             f"{n_experts // ep} experts take at most "
                             f"{(n_experts // ep) * ep if ep > 1 else 0} spare replicas")
        placement[rank].append(donor[depth])
    return placement


def survivor_placement(placement: Placement, dead: set[int]) -> tuple[Placement, dict[int, int]]:
    """(the placement over the survivors, in old order; {orphaned expert: its new holder's index
    among the survivors}) of a layer whose ranks `dead` (indices into `placement`) are lost."""
    alive = [list(experts) for r, experts in enumerate(placement) if r not in dead]
    if not alive:
        raise ValueError("no rank survives")
    held = {e for experts in alive for e in experts}
    moved = {}
    for r in sorted(dead):
        for e in placement[r]:
            if e in held:
                continue
            target = min(range(len(alive)), key=lambda i: (len(alive[i]), i))
            alive[target].append(e)
            held.add(e)
            moved[e] = target
    return alive, moved


def reshard(model: MoETransformer, group, rank: int, dead: set[int], checkpoint: str | None,
            seed: int, dtype: torch.dtype) -> tuple[dict, dict]:
    """Move every EP layer held here to `survivor_placement` of its old placement without the
    old group's ranks `dead`; this rank is `rank` of the new `group`. Returns, per layer,
    ({expert loaded anew: its new holder}, {every other expert a dead rank held: the first
    survivor still holding it (a replica, or the original)}), holders as new group indices."""
    cfg = model.cfg
    moves, served = {}, {}
    for index, old in dispatchers(model).items():
        layer = model.layers[str(index)]
        placement, moved = survivor_placement(old.placement, dead)
        moves[index] = moved
        served[index] = {e: next(i for i, held in enumerate(placement) if e in held)
                         for r in sorted(dead) for e in old.placement[r] if e not in moved}
        mine = placement[rank]
        kept = layer.moe.experts
        added = mine[len(kept.w_up):]
        if added:
            fresh = _experts(model, index, added, checkpoint, seed, dtype, kept.w_up.device)
            _hold(layer, cfg, mine, {name: torch.cat([param.data, getattr(fresh, name).data])
                                     for name, param in kept.named_parameters()})
        layer.moe.dispatcher = local_dispatcher(group, placement, cfg.n_experts, rank, old.options)
    return moves, served


def _hold(layer, cfg, mine: list[int], weights: dict[str, torch.Tensor]) -> None:
    """Give `layer` the experts `mine` with their `weights` (name -> `[len(mine), ...]`), keeping
    the run's kernel plan (`engine/shard.py: install_expert_kernels`)."""
    experts = GroupedExperts(len(mine), cfg.d_model, cfg.expert_hidden, cfg.expert_kind)
    experts.kernels = layer.moe.experts.kernels
    for name, tensor in weights.items():
        setattr(experts, name, nn.Parameter(tensor, requires_grad=False))
        mark_shard(experts, name, (cfg.n_experts, *tensor.shape[1:]), (mine, slice(None), slice(None)))
    layer.moe.experts = experts.eval()


def local_dispatcher(group, placement: Placement, n_experts: int, rank: int, options: dict) -> AllToAllDispatcher:
    """The EP exchange of a regrouped layer: the old dispatcher's `options`, over one node (an
    elastic group's ranks are local)."""
    return AllToAllDispatcher(group, placement, n_experts, rank, **dict(options, peer_nodes=None))


def _experts(model: MoETransformer, layer: int, experts: list[int], checkpoint: str | None,
             seed: int, dtype: torch.dtype, device: torch.device) -> GroupedExperts:
    """The weights `[len(experts), ...]` of `experts` of `layer`: their rows of the checkpoint's
    tensors, else the synthetic values of `seed`."""
    cfg = model.cfg
    out = GroupedExperts(len(experts), cfg.d_model, cfg.expert_hidden, cfg.expert_kind)
    for name, param in out.named_parameters():
        mark_shard(out, name, (cfg.n_experts, *param.shape[1:]), (experts, slice(None), slice(None)),
                   source=f"layers.{layer}.moe.experts.{name}")
    if checkpoint:
        load_checkpoint(out, checkpoint, dtype, device)
        return out
    return materialize(out, seed, dtype, device)


def join_placement(placement: Placement) -> tuple[Placement, dict[int, int]]:
    """(the placement with one more rank, last; {expert moved to it: the index of the rank that
    gave it up}) of a layer whose group a new rank joins (`serve --join`). The new rank takes
    slots from the rank holding the most (lowest index on ties), its last expert it has no copy
    of yet (the last appended: an orphan a recovery placed there goes first), until no rank holds
    more than one slot more than another. The others keep their experts in their slots, in
    order; nothing else moves. Every rank computes it alike."""
    ranks = [list(experts) for experts in placement] + [[]]
    new = ranks[-1]
    moved = {}
    while True:
        donor = max(range(len(ranks) - 1), key=lambda i: (len(ranks[i]), -i))
        if len(ranks[donor]) - len(new) <= 1:
            return ranks, moved
        expert = next((e for e in reversed(ranks[donor]) if e not in new), None)
        if expert is None:  # every expert it holds is already there (replicas only)
            return ranks, moved
        ranks[donor].remove(expert)
        new.append(expert)
        moved[expert] = donor


def reshard_join(model: MoETransformer, group, rank: int) -> dict[int, dict[int, int]]:
    """A rank of the old group, now `rank` of the joined `group` (one more rank, last): move
    every EP layer to `join_placement` of its placement, dropping the weights of the experts
    this rank gave up (nothing is sent: the new rank reads its own). Returns, per layer,
    {expert moved: the old index of the rank that gave it up}."""
    cfg = model.cfg
    moves = {}
    for index, old in dispatchers(model).items():
        layer = model.layers[str(index)]
        placement, moved = join_placement(old.placement)
        moves[index] = moved
        mine = placement[rank]
        kept = layer.moe.experts
        if len(mine) < len(kept.w_up):
            rows = [old.placement[rank].index(e) for e in mine]
            _hold(layer, cfg, mine, {name: param.data[rows].clone() for name, param in kept.named_parameters()})
        layer.moe.dispatcher = local_dispatcher(group, placement, cfg.n_experts, rank, old.options)
    return moves
