"""Elastic expert parallelism (`expertmesh serve --elastic`), as a client sees it: real servers
(ep4, four local CPU ranks over gloo), ranks SIGKILLed from outside while streams run. Every
request completes with the tokens of an independent reference, greedy, each request alone (the
tiny preset: the single-device model without a cache, `serving.naive_tokens`; a checkpoint:
transformers), so no token is lost, repeated or changed across the failure; later requests are
served; `/health` names the dead rank and says `degraded`; `/metrics` counts the loss; the log
says which experts moved; and nothing is left running. Rank 0's death still ends the server with
exit 1.

Three servers, each reused by the tests of one scenario, in order: plain ep4 (rank 2 killed
mid-stream, then rank 3: its experts rebuilt from the seed), ep4 on a tiny OLMoE checkpoint
(8 experts) with one spare replica per rank (rank 2 killed during the prefills: its first expert
then served by rank 1's replica, the other read from the safetensors; then rank 0 killed), and
plain ep4 that a new process joins after rank 2's loss (`serve --join`, streams running across
the join), back to four ranks.
"""

import os
import re
import signal
import subprocess
import sys
import threading
import time

import pytest
import torch

from expertmesh.checkpoint.tiny import reference_greedy, save_tiny_checkpoint
from expertmesh.elastic.experts import join_placement, spare_placement, survivor_placement
from expertmesh.elastic.ledger import Ledger
from expertmesh.engine.request import Request, TokenOutput
from expertmesh.model.transformer import reference_model
from elastic_streams import Streams, health, pid_of, prompts, reference, wait_health  # noqa: F401 (fixture)
from serving import naive_tokens

openai = pytest.importorskip("openai", reason="the server is driven by the openai client (pip install -e '.[test,serve]')")
pytest.importorskip("fastapi", reason="expertmesh serve needs the serve extra (pip install -e '.[serve]')")
transformers = pytest.importorskip("transformers", reason="the checkpoint's reference is transformers")
from test_server import Server  # noqa: E402

COMMON = ("--deployment", "ep4", "--elastic", "--timeout", "60", "--num-blocks", "64",
          "--block-size", "8", "--served-model-name", "tiny")


@pytest.fixture(scope="module")
def plain(tmp_path_factory):
    s = Server(tmp_path_factory.mktemp("logs"), *COMMON)
    yield s
    s.stop()


def test_health_lists_every_rank_ok_and_not_degraded_before_a_loss(plain):
    body = health(plain)
    assert body["degraded"] is False
    assert [r["rank"] for r in body["ranks"]] == [0, 1, 2, 3]
    assert {r["state"] for r in body["ranks"]} == {"ok"}
    assert sorted(r["pid"] for r in body["ranks"]) == plain.ranks()


def test_rank_2_killed_mid_stream_loses_no_token_and_later_requests_are_served(plain, reference):
    streams = Streams(plain, prompts(6, 12, 1), max_tokens=40)
    streams.wait_for(3)
    victim = pid_of(plain, 2)
    os.kill(victim, signal.SIGKILL)
    streams.check(reference)
    body = health(plain)
    assert body["degraded"] is True
    assert [r["state"] for r in body["ranks"]] == ["ok", "ok", "dead", "ok"]
    assert body["ranks"][2]["pid"] == victim
    assert plain.metric("expertmesh_rank_losses_total") == 1
    assert 0 < plain.metric("expertmesh_recovery_seconds_total") < 30
    log = plain.output()
    assert "rank 2 failed: process died from signal SIGKILL" in log
    assert re.search(r"elastic: lost rank 2 \(.*SIGKILL\); now ep3; experts loaded anew: expert 8 -> "
                     r"rank \d.*recovered in [\d.]+ s", log)
    Streams(plain, prompts(3, 5, 50), max_tokens=8).check(reference)  # served by ep3


def test_a_second_loss_rank_3_is_survived_too(plain, reference):
    streams = Streams(plain, prompts(4, 9, 90), max_tokens=30)
    streams.wait_for(2)
    os.kill(pid_of(plain, 3), signal.SIGKILL)
    streams.check(reference)
    assert [r["state"] for r in health(plain)["ranks"]] == ["ok", "ok", "dead", "dead"]
    assert plain.metric("expertmesh_rank_losses_total") == 2
    assert "now ep2" in plain.output()
    Streams(plain, prompts(2, 4, 120), max_tokens=6).check(reference)


def test_sigterm_after_losses_stops_the_survivors_with_exit_0_and_leaves_nothing(plain):
    plain.proc.send_signal(signal.SIGTERM)
    assert plain.proc.wait(60) == 0
    assert plain.leftovers.alive() == []


@pytest.fixture(scope="module")
def olmoe(tmp_path_factory):
    return save_tiny_checkpoint("olmoe", tmp_path_factory.mktemp("ckpt") / "olmoe")


@pytest.fixture(scope="module")
def hf_reference(olmoe):
    """transformers' greedy tokens of the checkpoint."""
    model = transformers.AutoModelForCausalLM.from_pretrained(olmoe, dtype=torch.float32).eval()
    return lambda prompt, n: reference_greedy(model, torch.tensor([prompt]), n)[0][0].tolist()


@pytest.fixture(scope="module")
def spares(olmoe, tmp_path_factory):
    """One spare replica per rank; a small token budget, so that prompts take many steps."""
    s = Server(tmp_path_factory.mktemp("logs"), *COMMON, "--model", str(olmoe),
               "--redundant-experts", "4", "--max-batched-tokens", "8")
    yield s
    s.stop()


def test_rank_2_killed_during_prefills_with_spares_serves_its_first_expert_from_the_replica(spares, hf_reference):
    victim = pid_of(spares, 2)
    # a short prompt, whose first token comes a step after it is admitted, and three that take
    # 30 steps of prefill each: when the first stream has a token the others are prefilling
    streams = Streams(spares, prompts(1, 8, 3) + prompts(3, 240, 7), max_tokens=10)
    streams.wait_for_first(0)
    os.kill(victim, signal.SIGKILL)
    assert not any(streams.tokens[1:])  # the kill came before their first tokens: prefills were cut
    streams.check(hf_reference)
    assert [r["state"] for r in health(spares)["ranks"]] == ["ok", "ok", "dead", "ok"]
    line = re.search(r"elastic: lost rank 2 .*", spares.output()).group(0)
    # rank 2 held experts 4 and 5; rank 1 a replica of 4 (`spare_placement`)
    assert re.search(r"experts loaded anew: expert 5 -> rank \d; still served by surviving copies: "
                     r"expert 4 -> rank 1;", line), line
    Streams(spares, prompts(2, 20, 33), max_tokens=5).check(hf_reference)


def test_a_joined_rank_reads_its_experts_from_the_checkpoint_and_its_own_loss_is_survived(spares, hf_reference, tmp_path):
    """After rank 2's loss (ep3: [0 1 2 5] [2 3 4] [6 7 0]) a process joins: it takes 5 and 2
    from rank 0 (counts 2 3 3 2; 2 keeps its copy on rank 1) and reads them from the
    safetensors; streams compare with transformers; then it is SIGKILLed mid-stream, and the
    launcher, which watches its pid, lets the others survive it (5 is loaded anew again)."""
    log = open(tmp_path / "join.log", "w+")
    joined = subprocess.Popen(join_command(spares), env=spares.env, stdout=log, stderr=subprocess.STDOUT)
    wait_health(spares, degraded=False)
    line = re.search(r"elastic: rank 4 \(pid \d+\) joined.*", spares.output()).group(0)
    assert "experts it took: expert 2 from rank 0; expert 5 from rank 0; joined" in line, line
    Streams(spares, prompts(6, 20, 11), max_tokens=6).check(hf_reference)
    assert spares.metric("expertmesh_prefix_cache_queries_total", dp_rank="3") > 0
    streams = Streams(spares, prompts(4, 9, 21), max_tokens=40)
    streams.wait_for(2)
    joined.kill()
    assert joined.wait(30) == -signal.SIGKILL
    streams.check(hf_reference)
    body = wait_health(spares, degraded=True)
    assert [r["state"] for r in body["ranks"]] == ["ok", "ok", "dead", "ok", "dead"]
    assert re.search(r"rank 4 \(joined, pid \d+\) ended.*\n(.*\n)*elastic: lost rank 4 .*now ep3; "
                     r"experts loaded anew: expert 5 -> rank \d; still served by surviving copies: "
                     r"expert 2 -> rank 1;", spares.output())


def test_killing_rank_0_still_ends_the_server_with_exit_1(spares):
    os.kill(pid_of(spares, 0), signal.SIGKILL)
    assert spares.proc.wait(60) == 1
    assert "rank 0 failed: process died from signal SIGKILL" in spares.output()
    assert spares.leftovers.alive() == []


# ---- the parts, against plain rules ----

def test_breaking_connections_ends_a_blocked_receive_and_spares_listening_sockets():
    """In a process of its own: it shuts down every connected TCP socket of its process."""
    code = """
import socket, threading
from expertmesh.elastic.sockets import break_connections
listener = socket.create_server(("127.0.0.1", 0))
client = socket.create_connection(listener.getsockname())
server, _ = listener.accept()
got = []
reader = threading.Thread(target=lambda: got.append(server.recv(1)))
reader.start()
assert break_connections() == 2
reader.join(10)
assert got == [b""], got
late = socket.create_connection(listener.getsockname())  # the listener still accepts
listener.accept()
print("ok")
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.stdout.strip() == "ok", out.stderr

def test_a_survivor_keeps_its_experts_and_orphans_go_to_the_least_loaded_survivor():
    placement = [[0, 1, 7], [2, 3], [4, 5, 0], [6, 7]]
    after, moved = survivor_placement(placement, {2})
    assert after == [[0, 1, 7], [2, 3, 4], [6, 7, 5]]
    assert moved == {4: 1, 5: 2}  # 0 lives on rank 0; ranks of two slots first, lowest first
    after, moved = survivor_placement(after, {1})
    assert after == [[0, 1, 7, 2, 4], [6, 7, 5, 3]]
    assert moved == {2: 0, 3: 1, 4: 0}


def test_spare_replicas_copy_the_next_ranks_first_experts():
    assert spare_placement(8, 4, 4) == [[0, 1, 2], [2, 3, 4], [4, 5, 6], [6, 7, 0]]
    assert spare_placement(8, 2, 3) == [[0, 1, 2, 3, 4, 5], [4, 5, 6, 7, 0]]
    with pytest.raises(ValueError, match="--redundant-experts 5"):
        spare_placement(4, 2, 5)


def test_the_ledger_reconciles_what_the_survivors_hold_with_what_was_streamed():
    ledger = Ledger()
    for i in range(4):
        ledger.add(Request(i, (1, 2), max_tokens=4))
    ledger.record([TokenOutput(0, 9, 0), TokenOutput(1, 8, 0), TokenOutput(1, 7, 1, "stop"),
                   TokenOutput(3, 5, 0)])
    ledger.drop(2)  # aborted by its client
    # 0 was on the dead rank; a survivor holds 3 one token past the stream (the step that made
    # it failed before rank 0 had it) and 2 (the step carrying its abort failed)
    outputs, requeue, drop = ledger.reconcile({3: [5, 6], 2: [4]}, queued=set())
    assert outputs == [TokenOutput(3, 6, 1)]
    assert requeue == [Request(0, (1, 2), max_tokens=4, generated=(9,))]
    assert drop == [2]
    assert ledger.reconcile({}, queued={0})[1] == [Request(3, (1, 2), max_tokens=4, generated=(5, 6))]


def test_the_outputs_of_a_step_caught_up_are_streamed_once_finished_ones_included():
    """A pipeline caught up the step its last stage recorded (`elastic/slots.py`): its outputs,
    whose tokens the kept scheduler holds too, reach the clients once, and a request that step
    finished is over, not re-queued; an output rank 0 had streamed before the loss is not sent again."""
    ledger = Ledger()
    for i in range(3):
        ledger.add(Request(i, (1, 2), max_tokens=2))
    ledger.record([TokenOutput(0, 9, 0), TokenOutput(1, 8, 0), TokenOutput(2, 7, 0),
                   TokenOutput(2, 6, 1, "length")])
    step = [TokenOutput(0, 5, 1, "length"), TokenOutput(1, 4, 1, "length"), TokenOutput(2, 6, 1, "length")]
    ledger.record(step[1:2])  # 1's output did reach rank 0
    outputs, requeue, drop = ledger.reconcile({}, queued=set(), caught_up=step)
    assert (outputs, requeue, drop) == ([step[0]], [], [])
    assert ledger.requests == {}


@pytest.mark.parametrize("argv, message", [
    (["--deployment", "tp2", "--elastic"], "tensor parallelism is not supported"),
    (["--deployment", "tp2pp2", "--elastic"], "tensor parallelism is not supported"),
    (["--deployment", "ep2", "--redundant-experts", "2"], "--eplb-interval K or --elastic"),
    (["--deployment", "ep2", "--elastic", "--redundant-experts", "2", "--eplb-interval", "8"],
     "drop --eplb-interval and --routing"),
    (["--deployment", "ep2", "--elastic", "--redundant-experts", "99"], "--redundant-experts 99"),
    (["--deployment", "ep2", "--elastic", "--a2a", "hierarchical"], "drop --a2a hierarchical"),
])
def test_unsupported_elastic_flags_are_one_line_errors_before_any_rank_starts(argv, message, cli_error):
    assert message in cli_error(["serve", "--port", "0", *argv])


def test_a_request_resumed_with_its_streamed_tokens_goes_on_from_the_next_one(small_config):
    """What a re-queued request does: the engine recomputes prompt + `generated` and outputs
    only the rest, at their indices in the output, within the same `max_tokens`."""
    from expertmesh.deployment import Deployment
    from expertmesh.engine.engine import Engine
    from expertmesh.engine.scheduler import EngineConfig

    cfg = small_config()
    model = reference_model(cfg)
    prompt = (5, 9, 14, 2, 7)
    full = naive_tokens(model, prompt, 8)
    engine = Engine(model, cfg, Deployment(), EngineConfig(num_blocks=16, block_size=4))
    engine.add_request(Request("r", prompt, 8, generated=tuple(full[:3])))
    outputs = []
    while engine.has_work:
        outputs += engine.step()
    assert [o.token for o in outputs] == full[3:]
    assert [o.index for o in outputs] == list(range(3, 8))
    assert outputs[-1].finished == "length"


def test_elastic_under_torchrun_is_a_one_line_error(monkeypatch, cli_error):
    """Each torchrun rank refuses alone (the recovery needs the local launcher's store and its
    dead-rank marker); here one rank of two, as torchrun would start it."""
    for name, value in (("RANK", "0"), ("WORLD_SIZE", "2"), ("LOCAL_RANK", "0"), ("LOCAL_WORLD_SIZE", "2")):
        monkeypatch.setenv(name, value)
    assert "under torchrun it is not supported" in cli_error(["serve", "--port", "0", "--deployment", "ep2", "--elastic"])


def test_prefix_cache_counters_follow_each_survivor_by_its_original_rank():
    """After a loss the survivors are renumbered: the API server's running totals must stay with
    each one (by its original rank), or a survivor with fewer prompt tokens than the dead rank
    had under its new number makes a counter go down, which prometheus refuses: the API server's
    receiving task died on it, and every open stream ended with "the channel to the engine
    broke" (seen once in three runs of tests/test_elastic_hang.py)."""
    from expertmesh.engine.scheduler import SchedulerStats
    from expertmesh.server.metrics import ServerMetrics

    metrics = ServerMetrics(engine_metrics=True)
    metrics.step([SchedulerStats(prompt_tokens=n) for n in (10, 30, 20, 5)], None)
    metrics.step([SchedulerStats(prompt_tokens=n) for n in (10, 30, 9)], None, origin=[0, 1, 3])
    assert metrics.seen == {0: (10, 0), 1: (30, 0), 2: (20, 0), 3: (9, 0)}
    with pytest.raises(ValueError):  # what numbering by position did
        metrics.step([SchedulerStats(prompt_tokens=n) for n in (10, 30, 9)], None)


def test_a_lost_ranks_kv_gauges_fall_to_zero():
    """A dead data-parallel rank holds no KV blocks: its gauges must not keep the last values it
    reported (prometheus' multiprocess mode cannot remove a label, so they read 0)."""
    from expertmesh.engine.scheduler import SchedulerStats
    from expertmesh.server.metrics import ServerMetrics

    metrics = ServerMetrics(engine_metrics=True)
    metrics.step([SchedulerStats(blocks_used=u, blocks_free=8 - u) for u in (1, 2, 3)], None)
    metrics.step([SchedulerStats(blocks_used=u, blocks_free=8 - u) for u in (4, 5)], None, origin=[0, 2])
    used = {dp: metrics.kv_used.labels(str(dp))._value.get() for dp in range(3)}
    free = {dp: metrics.kv_free.labels(str(dp))._value.get() for dp in range(3)}
    assert used == {0: 4, 1: 0, 2: 5} and free == {0: 4, 1: 0, 2: 3}


# ---- the way back: a new process joins a degraded server (`serve --join`) ----

@pytest.fixture(scope="module")
def rejoin(tmp_path_factory):
    s = Server(tmp_path_factory.mktemp("logs"), *COMMON)
    yield s
    s.stop()


def join_command(server: Server, url: str | None = None) -> list[str]:
    return [sys.executable, "-m", "expertmesh.cli", "serve", "--join", url or server.url + "/v1"]


def test_joining_a_server_with_all_its_ranks_is_a_one_line_error(rejoin):
    out = subprocess.run(join_command(rejoin), env=rejoin.env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 2, out.stderr
    assert out.stderr.strip().splitlines() == [
        f"error: the server at {rejoin.url}/v1 is not degraded: its 4 ranks are all up; --join only "
        f"replaces a lost rank"]


def test_a_process_joins_after_a_loss_takes_its_experts_and_serves_new_requests(rejoin, reference, tmp_path):
    os.kill(pid_of(rejoin, 2), signal.SIGKILL)
    wait_health(rejoin, degraded=True)
    # long streams: the joining process takes seconds to start (importing torch) before it asks
    streams = Streams(rejoin, prompts(6, 12, 5), max_tokens=200)
    streams.wait_for(3)
    log = open(tmp_path / "join.log", "w+")
    joined = subprocess.Popen(join_command(rejoin), env=rejoin.env, stdout=log, stderr=subprocess.STDOUT)
    try:
        body = wait_health(rejoin, degraded=False)
        after = time.monotonic()  # the join happened before this
        streams.check(reference)  # the streams running across the join: nothing lost or changed
        assert all(times[-1] > after for times in streams.times), "the streams ended before the join"
        assert [(r["rank"], r["state"]) for r in body["ranks"]] == [(0, "ok"), (1, "ok"), (2, "dead"),
                                                                     (3, "ok"), (4, "ok")]
        assert body["ranks"][4]["pid"] == joined.pid
        line = re.search(r"elastic: rank 4 \(pid \d+\) joined.*", rejoin.output()).group(0)
        # ep3 after the loss held 0-3 + 8, 11 / 4-7 + 9 / 12-15 + 10; the orphans go back
        assert re.search(r"now ep4; experts it took: expert 8 from rank 0; expert 9 from rank 1; "
                         r"expert 10 from rank 3; expert 11 from rank 0; joined in [\d.]+ s", line), line
        gaps = [b - a for times in streams.times for a, b in zip(times, times[1:])]
        print(f"{line}; longest gap between two streamed tokens across it: {max(gaps):.2f} s; "
              f"streams ended {min(t[-1] for t in streams.times) - after:.2f} s after it was seen")
        before = rejoin.metric("expertmesh_prefix_cache_queries_total", dp_rank="3")
        Streams(rejoin, prompts(8, 10, 70), max_tokens=8).check(reference)  # served by ep4 again
        # the new rank is data-parallel rank 3: some of the new prompts ran there
        assert rejoin.metric("expertmesh_prefix_cache_queries_total", dp_rank="3") > before
        assert joined.poll() is None
    finally:
        if joined.poll() is None and rejoin.proc.poll() is not None:
            joined.kill()
    rejoin.joined = joined


def test_after_another_loss_two_processes_race_to_join_one_is_admitted_the_other_refused(rejoin, reference, tmp_path):
    """Rank 1 lost too; two processes ask at once: one becomes rank 5, the other ends with one
    line, exit 2 (refused by rank 0, or told by /health that the server is not degraded)."""
    os.kill(pid_of(rejoin, 1), signal.SIGKILL)
    wait_health(rejoin, degraded=True)
    racers = [subprocess.Popen(join_command(rejoin), env=rejoin.env, stdout=subprocess.PIPE,
                               stderr=subprocess.STDOUT, text=True) for _ in range(2)]
    body = wait_health(rejoin, degraded=False)
    assert [r["state"] for r in body["ranks"]] == ["ok", "dead", "dead", "ok", "ok", "ok"]
    winner = next(p for p in racers if p.pid == body["ranks"][5]["pid"])
    loser = next(p for p in racers if p is not winner)
    out, _ = loser.communicate(timeout=120)
    assert loser.returncode == 2, out
    lines = out.strip().splitlines()
    assert len(lines) == 1 and re.fullmatch(r"error: (the server refused: the deployment already has its "
                                            r"4 ranks; none is missing|the server at .* is not degraded: .*)",
                                            lines[0]), out
    Streams(rejoin, prompts(6, 10, 40), max_tokens=8).check(reference)
    rejoin.joined = [rejoin.joined, winner]


def test_sigterm_after_a_join_stops_every_rank_the_joined_ones_too(rejoin):
    rejoin.proc.send_signal(signal.SIGTERM)
    assert rejoin.proc.wait(60) == 0
    for joined in rejoin.joined:
        assert joined.wait(30) == 0
    assert rejoin.leftovers.alive() == []


def test_join_is_a_one_line_error_without_a_server_or_without_elastic(cli_error):
    import http.server
    from expertmesh.launch import free_port

    port = free_port()
    assert "no expertmesh server answers at" in cli_error(["serve", "--join", f"http://127.0.0.1:{port}"])

    class Plain(http.server.BaseHTTPRequestHandler):  # what /health of a server without --elastic says
        def do_GET(self):
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.end_headers()
            self.wfile.write(b'{"status": "ok"}')

        def log_message(self, *_):
            pass

    httpd = http.server.HTTPServer(("127.0.0.1", 0), Plain)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    try:
        url = f"http://127.0.0.1:{httpd.server_address[1]}"
        assert "is not elastic (start it with --elastic)" in cli_error(["serve", "--join", url])
    finally:
        httpd.shutdown()


def test_a_joining_rank_takes_slots_from_the_fullest_ranks_until_the_counts_are_even():
    after, moved = join_placement([[0, 1, 2, 3, 8, 11], [4, 5, 6, 7, 9], [12, 13, 14, 15, 10]])
    assert after == [[0, 1, 2, 3], [4, 5, 6, 7], [12, 13, 14, 15], [11, 8, 9, 10]]
    assert moved == {11: 0, 8: 0, 9: 1, 10: 2}
    # uneven, with replicas: never two copies on the new rank; a replica may move
    before = [[0, 1, 2, 5], [2, 3, 4], [6, 7, 0, 4, 5, 1]]
    after, moved = join_placement(before)
    assert [len(r) for r in after] == [3, 3, 4, 3]
    assert all(len(set(r)) == len(r) for r in after)
    assert sorted(e for r in after for e in r) == sorted(e for r in before for e in r)  # nothing lost or copied
    assert moved == {1: 2, 5: 2, 2: 0}  # rank 0's last, 5, is there already: its 2 instead
    for e, donor in moved.items():  # each moved once, from a rank that held it, to the new rank only
        assert e in before[donor] and e not in after[donor] and e in after[-1]
    # already even: nothing moves; every expert held once (no replica) stays so
    for ep, n in ((2, 8), (3, 16), (5, 16)):
        start = [list(range(r * n // ep, (r + 1) * n // ep)) for r in range(ep)]
        after, moved = join_placement(start)
        counts = [len(r) for r in after]
        assert max(counts) - min(counts) <= 1 and sorted(e for r in after for e in r) == list(range(n))
        assert sorted(moved) == sorted(after[-1]) and all(e not in after[d] for e, d in moved.items())
