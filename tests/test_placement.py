"""Expert placement over nodes and routing statistics files."""

import json
import random
from collections import Counter

import pytest
import torch

from expertmesh.config import Workload, preset
from expertmesh.deployment import Deployment
from expertmesh.engine.spec import RunSpec
from expertmesh.engine.worker import run
from expertmesh.parallel.placement import (cross_node_rows, default_placement, load_placement,
                                           load_routing, optimise_placement, save_placement,
                                           save_routing)
from expertmesh.topology import Topology

TOPO = Topology(nodes=4, gpus_per_node=4)  # one expert per rank


def _skewed_stats(seed: int) -> dict[int, Counter]:
    """Tokens of node n's ranks prefer experts n, n+4, n+8, n+12, which the default placement
    scatters over all four nodes."""
    rng = random.Random(seed)
    stats = {}
    for src in range(16):
        favourites = [src // 4 + 4 * i for i in range(4)]
        c = Counter()
        for _ in range(200):
            pair = tuple(sorted(rng.sample(favourites if rng.random() < 0.8 else range(16), 2)))
            c[pair] += 1
        stats[src] = c
    return stats


def test_cross_node_rows_match_a_hand_count():
    placement = default_placement(1, 4, 4)[0]  # rank r holds expert r
    topo = Topology(nodes=2, gpus_per_node=2)  # experts 0, 1 on node 0; 2, 3 on node 1
    stats = {0: Counter({(2, 3): 5, (0, 2): 1})}
    assert cross_node_rows(placement, stats, topo, hierarchical=False) == 5 * 2 + 1
    assert cross_node_rows(placement, stats, topo, hierarchical=True) == 5 + 1


@pytest.mark.parametrize("hierarchical", [False, True])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_optimised_placement_never_does_worse_and_helps_on_skewed_routing(seed, hierarchical):
    stats = _skewed_stats(seed)
    start = default_placement(1, 16, 16)[0]
    best = optimise_placement(start, stats, TOPO, hierarchical)
    before = cross_node_rows(start, stats, TOPO, hierarchical)
    after = cross_node_rows(best, stats, TOPO, hierarchical)
    assert sorted(e for experts in best for e in experts) == list(range(16))
    assert after <= before
    assert after < 0.8 * before  # the skew is strong; co-locating favourites must pay off
    # starting from the optimum, it stays there
    assert cross_node_rows(optimise_placement(best, stats, TOPO, hierarchical), stats, TOPO, hierarchical) == after


def test_placement_and_routing_files_round_trip(tmp_path):
    layers = [optimise_placement(default_placement(1, 16, 16)[0], _skewed_stats(s), TOPO, False) for s in range(2)]
    save_placement(tmp_path / "p.json", layers, 16)
    assert load_placement(tmp_path / "p.json", n_layers=2, n_experts=16, ep=16) == layers
    stats = [_skewed_stats(0), _skewed_stats(1)]
    save_routing(tmp_path / "r.json", stats)
    assert load_routing(tmp_path / "r.json") == stats


@pytest.mark.parametrize("content, fragment", [
    ({"layers": [[[0, 1], [2, 3]]]}, "placement has 1 layers, the model has 2"),
    ({"layers": [[[0, 1], [2, 3]], [[0, 1], [2, 9]]]}, "layer 1 must hold each of the 4 experts at least once"),
    ({"layers": [[[0, 1, 2, 3]], [[0, 1, 2, 3]]]}, "covers 1 ranks, the deployment has ep=2"),
    ({"layers": [[[0, 1], [2, 3]], [[0, 0], [1, 2, 3]]]}, "no expert twice on one rank"),
    ({"nope": 1}, "is not a placement"),
])
def test_bad_placement_files_are_rejected_with_the_fix(tmp_path, content, fragment):
    path = tmp_path / "p.json"
    path.write_text(json.dumps(content))
    with pytest.raises(ValueError, match=fragment):
        load_placement(path, n_layers=2, n_experts=4, ep=2)


def test_missing_placement_file_is_named(tmp_path):
    with pytest.raises(ValueError, match="does not exist"):
        load_placement(tmp_path / "none.json", 2, 4, 2)


def _run(**kw):
    dep = Deployment.parse(kw.pop("deployment", "ep4"))
    workload = Workload(batch_size=4, prompt_len=40, gen_len=4, seed=5)
    return run(RunSpec(preset("tiny"), dep, workload, seed=2, **kw), timeout=120)


def test_outputs_are_identical_under_any_placement_and_exchange():
    reference = _run(deployment="single")
    shuffled = [list(torch.randperm(16, generator=torch.Generator().manual_seed(i)).view(4, 4).tolist())
                for i in range(4)]
    for kw in (dict(placement=shuffled), dict(a2a="hierarchical", gpus_per_node=2, a2a_chunks=2),
               dict(overlap="none"), dict(overlap="tbo"), dict(overlap="chunks")):
        assert torch.equal(_run(**kw).tokens, reference.tokens), kw


def test_recorded_routing_counts_every_token_of_every_layer():
    result = _run(record_routing=True, gpus_per_node=2)
    tokens = 4 * (40 + 3)  # prefill, then 3 decode steps feed tokens through the layers
    for layer in result.routing:
        assert sum(sum(c.values()) for c in layer.values()) == tokens
    assert result.exchange["nodes"] == 2 and result.exchange["cross_node_bytes"] > 0
