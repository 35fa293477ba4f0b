"""A rank that hangs without dying (`expertmesh serve --elastic`, `--hang-timeout`), as a client
sees it: a real ep4 server (four local CPU ranks over gloo) whose rank 2 is SIGSTOPped from
outside while streams run. The launcher sees its heartbeat stop, kills it and names it; the
survivors recover as from a death: every request completes with the undisturbed greedy tokens
(the tiny preset's single-device model), later requests are served, `/health` shows the rank
dead and `degraded`, `/metrics` counts the hang, and SIGTERM leaves no process behind. A stopped
process is continued and killed at teardown, so that nothing leaks when a test fails. A rank
stuck in a loop (the test-only fault `spin`) is killed the same way, its waiting peers never;
rank 0 stopped is killed and ends the server with exit 1, as its death does.

Then the detector's decision on plain numbers (`heartbeat.verdict`), and on a real heartbeat
thread: a main thread that computes without progress is hung, one that waits (as a rank waits in
a collective) or that progresses slowly is alive.
"""

import contextlib
import os
import re
import signal
import threading
import time

import pytest

from pathlib import Path

from expertmesh import faults, heartbeat
from expertmesh.heartbeat import BUSY_SHARE, Beats, Heartbeat, verdict

from elastic_streams import STREAM_S, Streams, health, pid_of, prompts, reference  # noqa: F401 (fixture)
from test_elastic import COMMON
from test_server import Server

HANG_S = 3.0  # below the default (5 s): the tests wait it out
FAULTY_CLI = str(Path(__file__).with_name("faulty_cli.py"))  # the CLI with faults enabled
SPIN_STEP = 12  # an idle step a few seconds after the warm-up (rank 0 steps every IDLE_S idle)


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    s = Server(tmp_path_factory.mktemp("logs"), *COMMON, "--hang-timeout", str(HANG_S))
    pids = list(s.ranks())
    yield s
    for pid in pids:  # a rank left stopped by a failed test: continue it, then end it
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGCONT)
            os.kill(pid, signal.SIGKILL)
    s.stop()


def gone(pid: int) -> bool:
    """Exited (and reaped, or a zombie waiting for it)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] == "Z"
    except FileNotFoundError:
        return True


def test_rank_2_stopped_mid_stream_is_killed_as_hung_and_no_token_is_lost(server, reference):
    streams = Streams(server, prompts(6, 12, 1), max_tokens=40)
    streams.wait_for(3)
    victim = pid_of(server, 2)
    stopped = time.monotonic()
    os.kill(victim, signal.SIGSTOP)
    streams.check(reference)
    assert gone(victim)
    log = server.output()
    hung = re.search(r"rank 2 hung for ([\d.]+) s \(no heartbeat: stopped, or frozen holding the GIL\); "
                     r"killed \(--hang-timeout 3\)", log)
    assert hung, log[-4000:]
    assert HANG_S <= float(hung.group(1)) < time.monotonic() - stopped  # printed to 0.1 s
    assert re.search(r"elastic: lost rank 2 \(hung for [\d.]+ s .*; killed\); now ep3", log), log[-4000:]
    body = health(server)
    assert body["degraded"] is True
    assert [r["state"] for r in body["ranks"]] == ["ok", "ok", "dead", "ok"]
    assert body["ranks"][2]["pid"] == victim
    assert server.metric("expertmesh_rank_losses_total") == 1
    assert server.metric("expertmesh_rank_hangs_total") == 1
    Streams(server, prompts(3, 5, 50), max_tokens=8).check(reference)  # served by ep3


def test_sigterm_after_a_hang_stops_the_survivors_with_exit_0_and_leaves_nothing(server):
    server.proc.send_signal(signal.SIGTERM)
    assert server.proc.wait(60) == 0
    assert server.leftovers.alive() == []


def test_rank_3_spinning_in_a_loop_is_killed_as_hung_and_the_others_serve_on(tmp_path, reference):
    """A rank that keeps computing and never finishes a layer (test-only fault `spin`, in an idle
    step after the warm-up): its heartbeat thread still beats, its progress does not. Rank 3, so
    that no survivor takes its number (the fault names a rank by its current number)."""
    s = Server(tmp_path, *COMMON, "--hang-timeout", str(HANG_S), cli=(FAULTY_CLI,),
               env={faults.ENV: f"3:{SPIN_STEP}:spin"})
    try:
        deadline = time.monotonic() + STREAM_S
        while "now ep3" not in s.output():
            assert time.monotonic() < deadline and s.proc.poll() is None, s.output()[-4000:]
            time.sleep(0.1)
        log = s.output()
        assert re.search(r"rank 3 hung for [\d.]+ s \(computing without progress: [\d.]+ s of CPU\); "
                         r"killed", log), log[-4000:]
        assert not re.search(r"rank [012] hung", log), log[-4000:]  # its peers waited: not blamed
        assert [r["state"] for r in health(s)["ranks"]] == ["ok", "ok", "ok", "dead"]
        Streams(s, prompts(3, 5, 50), max_tokens=8).check(reference)
        assert s.metric("expertmesh_rank_hangs_total") == 1
    finally:
        s.stop()


def test_rank_0_stopped_is_killed_as_hung_and_ends_the_server_with_exit_1(tmp_path):
    s = Server(tmp_path, "--deployment", "ep2", "--elastic", "--hang-timeout", str(HANG_S),
               "--num-blocks", "16", "--block-size", "8")
    rank0 = pid_of(s, 0)
    try:
        os.kill(rank0, signal.SIGSTOP)
        assert s.proc.wait(60) == 1
        log = s.output()
        assert re.search(r"rank 0 hung for [\d.]+ s \(no heartbeat.*; killed", log), log[-4000:]
        assert "error: rank 0 failed: hung for" in log, log[-4000:]
        assert s.leftovers.alive(wait_s=30) == []
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.kill(rank0, signal.SIGCONT)
            os.kill(rank0, signal.SIGKILL)
        s.stop()


# ---- the detector's decision ----

def test_a_rank_without_a_heartbeat_is_hung_and_one_not_yet_watched_is_not():
    assert verdict(now=100.0, beat=94.0, progress=94.0, busy=0.0, hang_s=5.0).startswith(
        "hung for 6.0 s (no heartbeat")
    assert verdict(now=100.0, beat=96.0, progress=96.0, busy=0.0, hang_s=5.0) is None
    # start-up, the first step and recovery: progress 0, whatever the beat says
    assert verdict(now=100.0, beat=0.0, progress=0.0, busy=50.0, hang_s=5.0) is None


def test_stale_progress_while_computing_is_hung_while_waiting_on_peers_or_progressing_is_alive():
    # a loop that never ends: 8 s without a layer finishing, computing all along
    assert verdict(now=100.0, beat=99.9, progress=92.0, busy=8.0, hang_s=5.0).startswith(
        "hung for 8.0 s (computing without progress")
    # starved of the CPU (a loaded machine) but still computing: hung all the same
    assert verdict(100.0, 99.9, 92.0, BUSY_SHARE * 8.0, 5.0) is not None
    # waiting in a collective for a hung peer: no CPU used, alive
    assert verdict(100.0, 99.9, 40.0, 0.01, 5.0) is None
    # slow but progressing: a layer finished 4 s ago, inside the bound
    assert verdict(100.0, 99.9, 96.0, 4.0, 5.0) is None


def on_a_heartbeat(work, hang_s: float) -> str | None:
    """The launcher's verdict on a heartbeat whose main thread (here a thread of its own) ran
    `work(beat)` after its first step, asked while it still runs."""
    beats, result, done = Beats(1), [], threading.Event()

    def rank():
        beat = Heartbeat(beats, 0)
        beat.arm()
        work(beat, done)

    t = threading.Thread(target=rank, daemon=True)
    t.start()
    time.sleep(hang_s * 2)
    result.append(beats.verdict(0, hang_s))
    done.set()
    t.join(10)
    return result[0]


def spin(beat, done):
    while not done.is_set():
        pass


def wait(beat, done):
    done.wait()


def slow_layers(beat, done):
    while not done.is_set():
        t = time.monotonic()
        while time.monotonic() - t < 0.1:  # a layer's forward that takes 0.1 s of CPU
            pass
        beat.mark()


def test_a_real_heartbeat_tells_a_spinning_thread_from_a_waiting_or_slow_one():
    assert (on_a_heartbeat(spin, 0.5) or "").startswith("hung for"), "spinning without progress"
    assert on_a_heartbeat(wait, 0.5) is None
    assert on_a_heartbeat(slow_layers, 0.5) is None


@pytest.mark.parametrize("argv, message", [
    (["--deployment", "ep2", "--elastic", "--hang-timeout", "0"], "--hang-timeout 0.0 must be a positive"),
    (["--deployment", "ep2", "--elastic", "--hang-timeout", "nan"], "--hang-timeout nan must be"),
    (["--deployment", "ep2", "--elastic", "--hang-timeout", "60", "--timeout", "30"], "below --timeout (30)"),
    (["--deployment", "ep2", "--hang-timeout", "5"], "--hang-timeout needs --elastic"),
])
def test_bad_hang_timeouts_are_one_line_errors_before_any_rank_starts(argv, message, cli_error):
    assert message in cli_error(["serve", "--port", "0", *argv])


def test_no_heartbeat_is_kept_outside_a_watched_launch():
    assert heartbeat.mine() is None
