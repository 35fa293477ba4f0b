"""Elastic expert parallelism with pipeline stages (`expertmesh serve --elastic --deployment
ep2pp2`: stage 0 is ranks 0 and 1, stage 1 ranks 2 and 3; pipeline i, data-parallel rank i, is
ranks i and 2 + i), as a client sees it: ranks SIGKILLed from outside while streams run. Every
request completes with the greedy tokens of the tiny preset's single-device model, later
requests are served, `/health` names the dead ranks and says `degraded`, and nothing is left
running. A stage left with no rank ends the server with exit 1 and one line naming it.

Three servers, taking their losses in order:
  plain:  rank 1 mid-stream (pipeline 1 broken: its requests recomputed on pipeline 0; rank 3 left
          over, serving experts only), then rank 2 mid-stream (ranks 0 and 3 now pair up, from
          different schedulers: they start empty), then `--join` refused, SIGTERM (exit 0).
  spares: one spare replica per stage (`--redundant-experts 1`: rank 0 copies expert 8 of rank 1,
          rank 2 expert 8 of rank 3): rank 3 mid-stream (its expert 8 served by rank 2's copy),
          rank 1 during the prefills (expert 8 by rank 0's), then rank 2: stage 1 is gone.
  ep4pp2: rank 5, killed by rank 4 as it recorded a step whose tokens never reached rank 0 (the
          intact pipelines stay, 0-4 catching up that step), then rank 4 (rank 0 left serving
          experts only).
Then the parts: `Layout`, the slots, the links and the labels, against plain rules.
"""

import os
import re
import signal
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from expertmesh.elastic.layout import Layout, StageLost
from expertmesh.elastic.slots import Copy, Slot, links_of, plan_slots, relabel, slot_of
from expertmesh.engine.request import TokenOutput
from expertmesh import faults
from expertmesh.deployment import Deployment
from expertmesh.server.engine_process import WARMUP_TOKENS
from elastic_streams import Streams, health, pid_of, prompts, reference  # noqa: F401 (fixture)

pytest.importorskip("openai", reason="the server is driven by the openai client (pip install -e '.[test,serve]')")
pytest.importorskip("fastapi", reason="expertmesh serve needs the serve extra (pip install -e '.[serve]')")
from test_server import Server  # noqa: E402

FAULTY_CLI = str(Path(__file__).with_name("faulty_cli.py"))  # the CLI with faults enabled
# rank 4 (pipeline 0's last stage) kills rank 5 right after recording its 5th sampled step (the
# warm-up's 2, then the third of the streams'), before the step's all-gather (`faults.py`)
CUT = f"4:{WARMUP_TOKENS + 3}:cut:5"
COMMON = ("--elastic", "--timeout", "60", "--num-blocks", "64", "--block-size", "8",
          "--served-model-name", "tiny")


@pytest.fixture(scope="module")
def servers(tmp_path_factory):
    """The one factory of this file's servers: started on first use, each kept for its tests."""
    started: dict[str, Server] = {}

    def get(name: str, *extra: str, deployment: str = "ep2pp2", **options) -> Server:
        if name not in started:
            started[name] = Server(tmp_path_factory.mktemp(name), "--deployment", deployment, *COMMON,
                                   *extra, **options)
        return started[name]

    yield get
    for s in started.values():
        s.stop()


@pytest.fixture
def plain(servers):
    return servers("plain")


@pytest.fixture
def spares(servers):
    return servers("spares", "--redundant-experts", "1", "--max-batched-tokens", "8")


def kill_mid_stream(server: Server, rank: int, reference, salt: int, tokens: int = 30) -> None:
    """SIGKILL `rank` while six streams of `tokens` run; each completes unchanged; three more
    are served."""
    streams = Streams(server, prompts(6, 12, salt), max_tokens=tokens)
    streams.wait_for(3)
    os.kill(pid_of(server, rank), signal.SIGKILL)
    streams.check(reference)
    Streams(server, prompts(3, 5, salt + 50), max_tokens=8).check(reference)


def lost_line(server: Server, rank: int) -> str:
    return re.search(rf"elastic: lost rank {rank} .*", server.output()).group(0)


def test_rank_1_killed_mid_stream_its_pipelines_requests_are_recomputed_on_pipeline_0(plain, reference):
    kill_mid_stream(plain, 1, reference, salt=1)
    body = health(plain)
    assert body["degraded"] is True
    assert [r["state"] for r in body["ranks"]] == ["ok", "dead", "ok", "ok"]
    line = lost_line(plain, 1)
    # stage 0 keeps rank 0 alone, which loads rank 1's experts; rank 3 serves stage 1's only
    assert re.search(r"now ep1 \+ ep2 \(2 stages\), 1 pipeline .*experts loaded anew: expert 8 -> "
                     r"rank 0 \(layers \[0, 1\]\);.* expert 15 -> rank 0 \(layers \[0, 1\]\);", line), line
    assert plain.metric("expertmesh_rank_losses_total") == 1
    assert plain.metric("expertmesh_kv_blocks_used", dp_rank="1") == 0  # its pool is gone


def test_rank_2_killed_next_ranks_0_and_3_pair_up_from_empty_schedulers(plain, reference):
    """Rank 0 served data-parallel rank 0, rank 3 none: their copies disagree, so the new
    pipeline starts empty; its requests are recomputed, and it is labelled anew in /metrics."""
    kill_mid_stream(plain, 2, reference, salt=7)
    assert [r["state"] for r in health(plain)["ranks"]] == ["ok", "dead", "dead", "ok"]
    line = lost_line(plain, 2)
    assert "now ep1 + ep1 (2 stages), 1 pipeline (schedulers kept: 0, started empty: 1)" in line, line
    assert "expert 0 -> rank 3 (layers [2, 3])" in line, line
    labels = re.findall(r'expertmesh_prefix_cache_queries_total\{dp_rank="(\d+)"\}', plain.get("/metrics").text)
    newest = max(labels, key=int)  # 2, or 3 had the first recovery restarted pipeline 0 too
    assert int(newest) >= 2 and plain.metric("expertmesh_prefix_cache_queries_total", dp_rank=newest) > 0


def test_joining_a_server_with_stages_is_a_one_line_error(plain):
    out = subprocess.run([sys.executable, "-m", "expertmesh.cli", "serve", "--join", plain.url + "/v1"],
                         env=plain.env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 2, out.stderr
    assert out.stderr.strip().splitlines() == [
        f"error: the server at {plain.url}/v1 runs pipeline stages (ep2pp2); --join replaces a lost "
        f"rank of plain expert parallelism (ep2, ep4, ...) only"]


def test_sigterm_after_losses_in_both_stages_exits_0_and_leaves_nothing(plain):
    plain.proc.send_signal(signal.SIGTERM)
    assert plain.proc.wait(60) == 0
    assert plain.leftovers.alive() == []


def test_rank_3_killed_mid_stream_its_replicated_expert_is_served_by_rank_2s_copy(spares, reference):
    kill_mid_stream(spares, 3, reference, salt=13)
    line = lost_line(spares, 3)
    assert re.search(r"now ep2 \+ ep1 .*experts loaded anew: expert 9 -> rank 2 \(layers \[2, 3\]\);.*"
                     r"still served by surviving copies: expert 8 -> rank 2 \(layers \[2, 3\]\);", line), line


def test_rank_1_killed_during_the_prefills_loses_nothing(spares, reference):
    # A short prompt first, decoding a token every step (the pipelines step together): the clock.
    # Then two prompts that take 30 steps of prefill each (8 tokens a step), and the kill two of
    # the clock's tokens later, well inside their prefills. Sent together, the short prompt could
    # queue behind a long one on its pipeline and get its first token as the long ones finished.
    victim = pid_of(spares, 1)  # asked first: a /health round trip under load outlasts the prefills
    clock = Streams(spares, prompts(1, 8, 3), max_tokens=24)
    clock.wait_for_first(0)
    long = Streams(spares, prompts(2, 240, 7), max_tokens=8)
    clock.wait_for(len(clock.tokens[0]) + 2)
    os.kill(victim, signal.SIGKILL)
    assert not any(long.tokens)  # the kill came before their first tokens: prefills were cut
    clock.check(reference)
    long.check(reference)
    assert "still served by surviving copies: expert 8 -> rank 0 (layers [0, 1])" in lost_line(spares, 1)
    assert [r["state"] for r in health(spares)["ranks"]] == ["ok", "dead", "ok", "dead"]


def test_a_stage_left_without_ranks_ends_the_server_with_exit_1_and_one_line(spares):
    os.kill(pid_of(spares, 2), signal.SIGKILL)
    assert spares.proc.wait(60) == 1
    assert ("rank 0 failed: StageLost: rank 2 of pipeline stage 1 died and no rank of that stage "
            "is left") in spares.output()
    assert spares.leftovers.alive() == []


def test_ep4pp2_keeps_its_intact_pipelines_and_rank_0_may_end_up_serving_experts_only(servers, reference):
    """Rank 5 lost, at the worst time for pipeline 0-4: rank 4 had sampled and recorded a step,
    whose tokens the all-gather never took to rank 0 (rank 4 killed rank 5 there: `CUT`). Each
    stream still has every token once, and pipelines 0-4, 2-6, 3-7 keep their schedulers, 0-4
    after catching up that step (rank 1 serves experts only). Then rank 4: 0-4 broken and no
    stage-1 rank free, so rank 0 serves experts only and still runs the engine loop; the two
    pipelines left serve everything."""
    s = servers("ep4pp2", deployment="ep4pp2", cli=(FAULTY_CLI,), env={faults.ENV: CUT})
    streams = Streams(s, prompts(6, 12, 21), max_tokens=16)
    streams.check(reference)
    line = lost_line(s, 5)
    assert re.search(r"now ep4 \+ ep3 \(2 stages\), 3 pipelines \(schedulers kept: 3 \([123] caught up a "
                     r"step\), started empty: 0\)", line), line
    kill_mid_stream(s, 4, reference, salt=31, tokens=16)
    assert "now ep4 + ep2 (2 stages), 2 pipelines" in lost_line(s, 4)
    assert [r["state"] for r in health(s)["ranks"]] == ["ok"] * 4 + ["dead", "dead", "ok", "ok"]
    s.proc.send_signal(signal.SIGTERM)
    assert s.proc.wait(60) == 0
    assert s.leftovers.alive() == []


# ---- the parts, against plain rules ----

def test_a_layout_loses_ranks_stage_by_stage_and_pairs_the_ith_survivors():
    layout = Layout.of(Deployment(ep=4, pp=2))
    assert layout.stages == ((0, 1, 2, 3), (4, 5, 6, 7))
    assert layout.pipelines == ((0, 4), (1, 5), (2, 6), (3, 7))
    after = layout.without({1, 6, 9})  # 9: no rank of this layout, ignored
    assert after.stages == ((0, 2, 3), (4, 5, 7))
    assert after.pipelines == ((0, 4), (2, 5), (3, 7))  # 2 and 5 lost their partners: paired
    assert after.members == [0, 2, 3, 4, 5, 7]
    small = Layout.of(Deployment(ep=2, pp=2)).without({1})
    assert small.pipelines == ((0, 2),) and small.stage_of(3) == 1  # 3 serves experts only
    assert small.describe() == "ep1 + ep2 (2 stages), 1 pipeline"
    assert small.without({2}).pipelines == ((0, 3),)
    assert Layout.of(Deployment(ep=4)).without({2}).describe() == "ep3"


def test_pipelines_that_lost_no_rank_stay_as_they_were():
    """Not the i-th survivors of each stage: (2, 6) and (3, 7) would become (1, 6) and (2, 7)."""
    after = Layout.of(Deployment(ep=4, pp=2)).without({5})
    assert after.pipelines == ((0, 4), (2, 6), (3, 7))  # rank 1 serves experts only
    again = after.without({4})  # (0, 4) broken: 0 pairs with no one left in stage 1 ...
    assert again.pipelines == ((2, 6), (3, 7))  # ... so rank 0 serves experts only too
    assert Layout(((0, 1, 3),)).with_rank(4).pipelines == ((0,), (1,), (3,), (4,))


def test_a_stage_with_no_rank_left_is_stage_lost_naming_its_last_ranks():
    with pytest.raises(StageLost, match=r"^rank 3 of pipeline stage 1 died and no rank of that stage is left$"):
        Layout(((0, 1), (3,))).without({3})
    with pytest.raises(StageLost, match=r"^ranks 2, 3 of pipeline stage 1 died"):
        Layout.of(Deployment(ep=2, pp=2)).without({2, 3})


def test_a_pipeline_keeps_a_scheduler_only_when_all_its_copies_hold_the_same_one():
    layout = Layout(((0, 2, 3), (4, 5, 7)))
    same, other = {"r": [5, 6]}, {"r": [5, 6, 7]}
    before = {0: Copy(0, same), 4: Copy(0, same),    # pipeline 0 lost no rank: kept
              2: Copy(2, {}), 5: Copy(1, {}),        # ranks of two pipelines: empty
              3: Copy(3, same), 7: Copy(3, other)}   # a token apart, no step to catch up: empty
    slots = plan_slots(layout, before)
    assert slots == [Slot((0, 4), 0), Slot((2, 5), None), Slot((3, 7), None)]
    assert plan_slots(Layout(((0, 1, 3),)), {0: Copy(0, {}), 1: Copy(1, {}), 3: Copy(None, {})}) == [
        Slot((0,), 0), Slot((1,), 1), Slot((3,), None)]  # one stage: each its own; a joined one empty
    assert [slot_of(slots, r) for r in (0, 5, 7)] == [0, 1, 2]
    assert slot_of(plan_slots(Layout(((0,), (2, 3))), {0: Copy(0, {}), 2: Copy(0, {}), 3: Copy(1, {})}), 3) is None


def test_a_copy_one_step_behind_its_last_stage_catches_up_and_anything_else_starts_empty():
    """The step was cut after the last stage sampled and recorded it, before the all-gather
    took its tokens to the first stage: the first stage finishes it from the last's outputs."""
    step = (("a", 1), ("b", 1), ("c", 4))  # c's prefill chunk samples nothing
    outputs = [TokenOutput("a", 9, 2), TokenOutput("b", 4, 1, finished="length")]
    first = Copy(0, {"a": [5, 6], "b": [7], "c": []}, "stats before", finished=3, open=step)
    last = Copy(0, {"a": [5, 6, 9], "c": []}, "stats after", finished=4, last=(step, outputs))
    layout = Layout(((0,), (4,)))
    assert plan_slots(layout, {0: first, 4: last}) == [Slot((0, 4), 0, behind=(0,))]
    middle = Layout(((0,), (2,), (4,)))  # a middle stage the all-gather reached: level with the last
    assert plan_slots(middle, {0: first, 2: replace(last, last=None), 4: last}) == [Slot((0, 2, 4), 0, (0,))]
    disagree = [replace(first, held={"a": [5, 7], "b": [7], "c": []}),  # another token before
                replace(first, open=step[:2]),                          # another step scheduled
                replace(first, open=None),                              # the step not scheduled
                replace(first, finished=2),                             # two steps behind
                replace(first, dp=1)]                                   # another scheduler
    for copy in disagree:
        assert plan_slots(layout, {0: copy, 4: last}) == [Slot((0, 4), None)], copy
    # level with the last stage before it sampled, then a step begun but not finished by either
    level = replace(last, open=step, last=((("a", 1),), [TokenOutput("a", 5, 1)]))
    assert plan_slots(layout, {0: replace(level, last=None), 4: level}) == [Slot((0, 4), 0)]


def test_links_join_each_pipelines_neighbours_in_the_new_numbering():
    layout = Layout(((0, 2, 3), (4, 5, 7)))  # new group ranks: 0 2 3 -> 0 1 2, 4 5 7 -> 3 4 5
    slots = plan_slots(layout, {r: Copy(None, {}) for r in layout.members})
    cpu = torch.device("cpu")
    first, last = links_of(layout, slots, 2, cpu), links_of(layout, slots, 5, cpu)
    assert (first.is_first, first.is_last, first.prev_rank, first.next_rank, first.token_peer) == (True, False, None, 4, 4)
    assert (last.is_first, last.is_last, last.prev_rank, last.next_rank, last.token_peer) == (False, True, 1, None, 1)
    alone = links_of(Layout(((0,), (2, 3))), [Slot((0, 2), 0)], 3, cpu)  # experts only: no neighbour
    assert (alone.is_first, alone.is_last, alone.prev_rank, alone.next_rank) == (False, True, None, None)
    assert links_of(Layout(((0, 1),)), [Slot((0,), 0), Slot((1,), 1)], 1, cpu) is None


def test_a_kept_scheduler_keeps_its_metrics_label_and_an_empty_one_gets_a_label_never_used():
    assert relabel([0, 1, 2], [0, None], fresh=3) == ([0, 3], 4)
    assert relabel([0, 3], [None], fresh=4) == ([4], 5)  # never 1, 2 or 3 again
