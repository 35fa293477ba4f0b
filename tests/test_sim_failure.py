"""The simulator's model of a rank's loss under `serve --elastic` (`sim/failure.py`,
`expertmesh simulate-failure`), and the uneven expert placements it simulates after one."""

import pytest

from expertmesh.config import Workload, preset
from expertmesh.deployment import Deployment
from expertmesh.elastic.experts import spare_placement
from expertmesh.sim.hardware import get_profile
from expertmesh.sim.scenario import Scenario
from expertmesh.sim.simulator import simulate

H100 = get_profile("h100")
PAPER = preset("paper")
# one expert of the paper preset in one layer: two [4096, 16384] bf16 matrices
PAPER_EXPERT = 2 * 4096 * 16384 * 2


def paper(ep: int, batch: int = 8, prompt: int = 256, gen: int = 8, **changes) -> Scenario:
    return Scenario(PAPER, Deployment(ep=ep), Workload(batch_size=batch, prompt_len=prompt, gen_len=gen), H100,
                    **changes)


def test_the_contiguous_placement_given_is_the_default():
    default, given = paper(4), paper(4, placement=((0, 1, 2, 3), (4, 5, 6, 7), (8, 9, 10, 11), (12, 13, 14, 15)))
    a, b = simulate(default), simulate(given)
    assert a.metrics == b.metrics and a.memory == b.memory


def test_a_rank_holding_more_experts_holds_their_weights_and_takes_their_tokens():
    even = simulate(paper(4))
    spares = spare_placement(16, 4, 4)  # one spare each: experts 4, 8, 12, 0 held twice
    doubled = simulate(paper(4, placement=tuple(map(tuple, spares))))
    assert doubled.memory.weights_bytes - even.memory.weights_bytes == 16 * PAPER_EXPERT  # 16 layers
    assert doubled.scenario.rank_shares() == [0.25] * 4  # a replica's tokens split over its copies
    uneven = paper(3, placement=(tuple(range(6)), tuple(range(6, 11)), tuple(range(11, 16))))
    assert uneven.rank_shares() == [6 / 16, 5 / 16, 5 / 16]
    # the busiest rank's extra expert slows every decode step against an even split of its work
    assert simulate(uneven).metrics.tpot_s > simulate(paper(4)).metrics.tpot_s


def test_a_placement_must_cover_the_ranks_of_plain_ep():
    with pytest.raises(ValueError, match="placement layer 0 covers 2 ranks"):
        paper(4, placement=((0, 1), (2, 3)))
    with pytest.raises(ValueError, match="plain EP only"):
        Scenario(PAPER, Deployment(ep=2, pp=2), Workload(batch_size=4, prompt_len=8, gen_len=2), H100,
                 placement=(tuple(range(8)), tuple(range(8, 16))))
