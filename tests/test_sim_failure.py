"""The simulator's model of a rank's loss under `serve --elastic` (`sim/failure.py`,
`expertmesh simulate-failure`), and the uneven expert placements it simulates after one."""

import dataclasses
import json

import pytest

from expertmesh.cli import main
from expertmesh.config import Workload, preset
from expertmesh.deployment import Deployment
from expertmesh.elastic.experts import spare_placement
from expertmesh.sim.failure import FailureModel, simulate_failure, start
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


TINY = preset("tiny")  # 4 MoE layers of 16 experts, d_model 256, expert hidden 1024, fp32
# one expert of the tiny preset in one layer: two [256, 1024] fp32 matrices
TINY_EXPERT = 2 * 256 * 1024 * 4


def tiny_ep4(hw=H100) -> Scenario:
    return Scenario(TINY, Deployment(ep=4), Workload(batch_size=8, prompt_len=16, gen_len=60), hw)


def test_the_bytes_reloaded_are_the_dead_ranks_experts_without_a_surviving_copy():
    # ep4 without spares: rank 2 holds experts 8-11, none held elsewhere; the survivors hold
    # four each, so 8, 9, 10 go to survivors 0, 1, 2 and 11 to survivor 0: two experts there
    _, (loss,) = simulate_failure(tiny_ep4(), 0, FailureModel(), [2])
    assert (loss.loaded, loss.covered) == (4, 0)
    assert loss.reload_bytes == 4 * 4 * TINY_EXPERT and loss.slowest_bytes == 2 * 4 * TINY_EXPERT
    # one spare each: rank 1's holds expert 8 (rank 2's first), rank 2's holds 12 (rank 3's
    # first); 9, 10, 11 are loaded, one on each survivor
    _, (loss,) = simulate_failure(tiny_ep4(), 4, FailureModel(), [2])
    assert (loss.loaded, loss.covered) == (3, 2)
    assert loss.reload_bytes == 3 * 4 * TINY_EXPERT and loss.slowest_bytes == 4 * TINY_EXPERT


def test_replicas_of_every_expert_make_the_reload_free_and_the_gap_shorter():
    _, bare = simulate_failure(tiny_ep4(), 0, FailureModel())
    _, covered = simulate_failure(tiny_ep4(), 16, FailureModel())
    assert [l.lost for l in covered] == [1, 2, 3]
    for without, with_ in zip(bare, covered):
        assert with_.loaded == 0 and with_.reload_bytes == 0 and with_.reload_s == 0
        assert without.reload_s > 0 and with_.gap_s < without.gap_s


def test_more_bandwidth_never_lengthens_the_gap():
    gaps = [simulate_failure(tiny_ep4(), 0, FailureModel(reload_bw=gb * 1e9), [2])[1][0].gap_s
            for gb in (0.1, 1, 5, 50)]
    assert gaps == sorted(gaps, reverse=True) and gaps[0] > gaps[-1]
    copies = [simulate_failure(tiny_ep4(H100.with_(h2d_bw=gb * 1e9)), 0, FailureModel(), [2])[1][0].gap_s
              for gb in (1, 16, 64)]
    assert copies == sorted(copies, reverse=True) and copies[0] > copies[-1]
    # a CPU profile's device is its memory: nothing to copy
    assert simulate_failure(tiny_ep4(H100.with_(h2d_bw=None)), 0, FailureModel(), [2])[1][0].reload_s == (
        2 * 4 * TINY_EXPERT / FailureModel().reload_bw)


def test_the_terms_add_up_to_the_gap():
    model = FailureModel(detect_s=0.5, regroup_s_per_rank=0.25, generated=10)
    _, (loss,) = simulate_failure(tiny_ep4(), 0, model, [3])
    assert loss.detect_s == 0.5 and loss.regroup_s == 0.75  # three survivors
    assert loss.gap_s == pytest.approx(0.5 + 0.75 + loss.reload_s + loss.recompute_s)
    # the dead rank's two requests prefilled again with their 16 + 10 tokens, on the survivors
    after = dataclasses.replace(start(tiny_ep4(), 0), deployment=Deployment(ep=3), gpus=None,
                                placement=((0, 1, 2, 3, 12, 15), (4, 5, 6, 7, 13), (8, 9, 10, 11, 14)),
                                workload=Workload(batch_size=2, prompt_len=26, gen_len=1))
    assert loss.recompute_s == simulate(after).metrics.ttft_s


def test_ep2_to_ep1_that_no_longer_fits_ends_the_server(tmp_path, capsys):
    # the paper model: 69 GB of experts fit two H100s, not one
    out = tmp_path / "failure.json"
    assert main(["simulate-failure", "--deployment", "ep2", "--batch", "2", "--prompt-len", "1000",
                 "--gen-len", "16", "--json", str(out)]) == 0
    assert "the survivors cannot hold the experts, so a loss ends the server" in capsys.readouterr().out
    (loss,) = json.loads(out.read_text())["losses"]
    assert loss["lost"] == 1 and loss["fits"] is False
    assert loss["gap_s"] is None and loss["tps_after"] is None and loss["throughput_loss"] is None


def test_json_has_every_figure(tmp_path, capsys):
    out = tmp_path / "failure.json"
    assert main(["simulate-failure", "--preset", "tiny", "--deployment", "ep4", "--batch", "8",
                 "--prompt-len", "16", "--gen-len", "8", "--redundant-experts", "4", "--json", str(out)]) == 0
    assert "mean over the ranks lost" in capsys.readouterr().out
    data = json.loads(out.read_text())
    assert set(data) == {"deployment", "hardware", "redundant_experts", "expert_bytes", "reload_bandwidth",
                         "h2d_bandwidth", "memory_before_bytes", "losses"}
    assert data["expert_bytes"] == TINY_EXPERT and data["redundant_experts"] == 4
    assert [l["lost"] for l in data["losses"]] == [1, 2, 3]
    assert set(data["losses"][0]) == {
        "lost", "loaded", "covered", "reload_bytes", "slowest_bytes", "detect_s", "regroup_s", "reload_s",
        "recompute_s", "fits", "tps_before", "tps_after", "gap_s", "throughput_loss"}


BAD_FLAGS = {
    "not ep": (["--deployment", "tp2"], "plain expert parallelism (ep2, ep4, ...), not tp2"),
    "ep1": (["--deployment", "ep1"], "plain expert parallelism"),
    "stages": (["--deployment", "ep2pp2"], "not ep2pp2 (serve --elastic survives a loss with pipeline "
                                           "stages; its cost, a broken pipeline's recompute included, is not modelled)"),
    "rank 0": (["--lost-rank", "0"], "--lost-rank 0: ranks 1 .. 15 can be lost"),
    "rank past the group": (["--lost-rank", "16"], "--lost-rank 16"),
    "bandwidth": (["--reload-bandwidth", "0"], "--reload-bandwidth 0 GB/s must be > 0"),
    "generated": (["--gen-len", "8", "--generated", "8"], "--generated 8 must be in [0, 8)"),
    "one token": (["--gen-len", "1"], "--gen-len 1 must be at least 2"),
    "negative detect": (["--detect=-1s"], "detection -1.0 s and regrouping 0.063 s per rank must be >= 0"),
    "spares": (["--redundant-experts", "-1"], "--redundant-experts -1 must be >= 0"),
    "too many spares": (["--deployment", "ep4", "--redundant-experts", "17"],
                        "--redundant-experts 17: ep4 ranks of 4 experts take at most 16 spare replicas"),
    "batch": (["--batch", "0"], "--batch 0 must be at least 1"),
    "experts": (["--deployment", "ep3"], "ep=3 must divide the 16 experts"),
}


@pytest.mark.parametrize("name", BAD_FLAGS)
def test_bad_values_are_one_error_line(name, cli_error):
    argv, expected = BAD_FLAGS[name]
    assert expected in cli_error(["simulate-failure", *argv])
