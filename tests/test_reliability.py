"""A run ends within its timeout when a rank dies, raises, stalls or computes NaN, names the rank
and the reason, exits non-zero and leaves no process; the same seed gives the same tokens, run
after run and on every deployment, greedy or sampled.

Faults come from the test-only hook `expertmesh/faults.py` (EXPERTMESH_FAULT=RANK:STEP:KIND),
enabled here in this process (`faults_on`) or through `tests/faulty_cli.py` in a subprocess.
Steps 0 and 1 also run in the warm-up, so the faults here hit step 3 of the measured run.
"""

import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from expertmesh import faults
from expertmesh.cli import main
from expertmesh.config import Workload, preset
from expertmesh.deployment import Deployment
from expertmesh.engine.finite import NonFiniteError
from expertmesh.engine.spec import RunSpec
from expertmesh.engine.worker import run, run_rank
from expertmesh.launch import launch

RUN = ["run", "--batch", "2", "--prompt-len", "8", "--gen-len", "6"]
FAULTY_CLI = str(Path(__file__).with_name("faulty_cli.py"))  # the CLI with faults enabled
TAG = "EXPERTMESH_TEST_TAG"


def _stat(pid: str) -> tuple[str, int] | None:
    """(state, process group) of a live process, None if it is gone."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return fields[0], int(fields[2])


def _carries(pid: str, needle: bytes) -> bool:
    try:
        with open(f"/proc/{pid}/environ", "rb") as f:
            return needle in f.read().split(b"\0")
    except OSError:  # gone meanwhile, or not ours
        return False


class Leftovers:
    """Finds the processes a test started that are still alive, wherever they are now.

    Two marks, because neither alone sees them all: a process exec'd with `env()` (a subprocess,
    a torchrun agent and its workers, which torchrun puts in a session of their own) and its forks
    show the tag in /proc/PID/environ, even once orphaned; a rank forked from this process (whose
    environment changes after exec never reach /proc/PID/environ) and its forks stay in this
    process's group. Members of the group that existed before the test are not counted."""

    def __init__(self):
        self.tag = uuid.uuid4().hex
        self.group = os.getpgrp()
        self.before = set(self._group())

    def env(self, **extra) -> dict:
        return {**os.environ, TAG: self.tag, "OMP_NUM_THREADS": "1", **extra}

    def _group(self) -> list[str]:
        return [pid for pid in filter(str.isdigit, os.listdir("/proc"))
                if (_stat(pid) or ("", None))[1] == self.group]

    def alive(self, wait_s: float = 5.0) -> list[int]:
        """Live (not zombie) processes of this test other than this one, after up to `wait_s`
        for them to go (a parent may still be reaping its children)."""
        needle = f"{TAG}={self.tag}".encode()
        deadline = time.monotonic() + wait_s
        while True:
            candidates = {pid for pid in filter(str.isdigit, os.listdir("/proc")) if _carries(pid, needle)}
            candidates |= set(self._group()) - self.before
            alive = sorted(int(pid) for pid in candidates
                           if int(pid) != os.getpid() and (_stat(pid) or ("Z",))[0] != "Z")
            if not alive or time.monotonic() > deadline:
                return alive
            time.sleep(0.2)


@pytest.fixture
def faults_on(monkeypatch):
    """Fault injection enabled in this process and the ranks it forks, for this test only."""
    monkeypatch.setattr(faults, "ENABLED", True)


def last_line(text: str) -> str:
    return text.strip().splitlines()[-1]


def test_fault_specs_parse_and_bad_ones_are_rejected():
    assert faults.parse("1:3:kill") == faults.Fault(1, 3, "kill")
    assert faults.parse("0:2:nan:1") == faults.Fault(0, 2, "nan", 1)
    for bad in ("1:3", "1:3:explode", "x:3:kill", "1:3:kill:2", "1:3:nan:x"):
        with pytest.raises(ValueError, match="RANK:STEP:KIND"):
            faults.parse(bad)


def test_the_fault_variable_does_nothing_unless_a_test_enables_it(monkeypatch, capsys):
    """No entry point enables fault injection: a stray EXPERTMESH_FAULT leaves a run alone."""
    monkeypatch.setenv(faults.ENV, "0:3:raise")
    assert main([*RUN, "--show-tokens"]) == 0
    assert "sequence 1:" in capsys.readouterr().out


def _leave_a_process_behind(device) -> None:
    """Each rank forks a process that outlives the run and that the launcher knows nothing of."""
    if os.fork() == 0:
        time.sleep(60)
        os._exit(0)
    dist.barrier()


def test_the_leftover_check_finds_processes_that_outlive_a_run():
    """The check the tests below rely on can fail: processes forked by the ranks of a run started
    in this process, orphaned once the ranks exit, are found."""
    leftovers = Leftovers()
    launch(_leave_a_process_behind, 2, timeout=60)
    survivors = leftovers.alive(wait_s=1.0)
    for pid in survivors:
        os.kill(pid, signal.SIGKILL)
    assert len(survivors) == 2


def test_cli_rank_killed_mid_decode_exits_nonzero_fast_and_leaves_no_process():
    leftovers = Leftovers()
    t0 = time.monotonic()
    proc = subprocess.run([sys.executable, FAULTY_CLI, *RUN, "--deployment", "ep2", "--timeout", "120"],
                          env=leftovers.env(**{faults.ENV: "1:3:kill"}), capture_output=True,
                          text=True, timeout=180)
    elapsed = time.monotonic() - t0
    assert proc.returncode == 1, proc.stderr
    assert last_line(proc.stderr).startswith(
        "error: rank 1 failed: process died from signal SIGKILL"), proc.stderr
    assert elapsed < 60  # the failure, not the 120 s timeout, ends the run (start-up: ~5-25 s)
    assert leftovers.alive() == []


def _main_with_fault(fault: str, argv: list[str], monkeypatch, capfd) -> tuple[int, str, float]:
    """`expertmesh ...argv` in this process (ranks forked from it) with a fault injected."""
    leftovers = Leftovers()
    monkeypatch.setattr(faults, "ENABLED", True)
    monkeypatch.setenv(faults.ENV, fault)
    t0 = time.monotonic()
    code = main(argv)
    elapsed = time.monotonic() - t0
    assert leftovers.alive() == []
    return code, capfd.readouterr().err, elapsed


def test_cli_rank_that_raises_is_named_with_its_error(monkeypatch, capfd):
    code, err, elapsed = _main_with_fault("1:3:raise", [*RUN, "--deployment", "ep2", "--timeout", "60"],
                                          monkeypatch, capfd)
    assert code == 1
    assert last_line(err).startswith(
        "error: rank 1 failed: RuntimeError: injected fault (EXPERTMESH_FAULT) at step 3")
    assert elapsed < 30


def test_cli_stalled_rank_ends_the_run_at_the_timeout_with_its_stack(monkeypatch, capfd):
    # 15 s: time to reach step 3 on a busy machine, so that the timeout finds the ranks stalled
    code, err, elapsed = _main_with_fault("1:3:stall", [*RUN, "--deployment", "ep2", "--timeout", "15"],
                                          monkeypatch, capfd)
    assert code == 1
    assert last_line(err).startswith("error: timed out after 15 s; ranks [0, 1] had not finished")
    stalled = err.split("rank 1 at the timeout:")[1]
    assert "expertmesh/faults.py" in stalled  # the stalled rank's stack shows where it waits
    assert 15 <= elapsed < 15 + 10


def test_cli_nan_in_a_pipeline_stage_names_the_stage_and_layer(monkeypatch, capfd):
    """pp2: rank 0 holds layers 0-1, rank 1 layers 2-3. NaN out of layer 1 on rank 0 makes rank
    1's logits NaN too; the run blames the first: rank 0, layer 1."""
    code, err, _ = _main_with_fault("0:3:nan:1", [*RUN, "--deployment", "pp2", "--timeout", "60"],
                                    monkeypatch, capfd)
    assert code == 1
    assert last_line(err).startswith(
        "error: rank 0 failed: NonFiniteError: non-finite hidden states at step 3; "
        "first non-finite layer output: layer 1")


def test_ctrl_c_stops_every_rank_and_prints_one_line(tmp_path):
    leftovers = Leftovers()
    err_path = tmp_path / "stderr"
    with open(err_path, "w") as err:
        proc = subprocess.Popen([sys.executable, FAULTY_CLI, *RUN, "--deployment", "ep2", "--timeout", "120"],
                                env=leftovers.env(**{faults.ENV: "0:3:stall"}), stdout=subprocess.DEVNULL,
                                stderr=err, start_new_session=True)
    try:
        deadline = time.monotonic() + 60
        while "stalls at step 3" not in err_path.read_text():  # both ranks are in decode
            assert time.monotonic() < deadline and proc.poll() is None, err_path.read_text()
            time.sleep(0.2)
        os.killpg(proc.pid, signal.SIGINT)  # Ctrl-C: SIGINT to the terminal's whole process group
        code = proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    text = err_path.read_text()
    assert code == 130, text
    assert "Traceback" not in text
    assert last_line(text) == "error: interrupted (Ctrl-C); every rank was stopped"
    assert leftovers.alive() == []


@pytest.mark.parametrize("layer", [0, 2])
def test_nan_in_a_layer_is_reported_with_the_step_and_that_layer(monkeypatch, faults_on, layer):
    monkeypatch.setenv(faults.ENV, f"0:4:nan:{layer}")
    spec = RunSpec(preset("tiny"), Deployment(), Workload(batch_size=2, prompt_len=8, gen_len=6))
    message = f"non-finite logits at step 4; first non-finite layer output: layer {layer}$"
    with pytest.raises(NonFiniteError, match=message):
        run_rank(spec, torch.device("cpu"))


def _tokens(spec: RunSpec) -> torch.Tensor:
    return run(spec, timeout=120).tokens


def test_same_seed_same_tokens_twice_and_on_every_deployment_when_sampling():
    """Temperature / top-p sampling draws from (seed, step, sequence), never from how sequences
    are split over ranks: single, ep2 and tp2pp2 sample the same tokens, and again on a rerun."""
    cfg = preset("tiny")
    sampled = Workload(batch_size=4, prompt_len=8, gen_len=8, seed=5, temperature=0.9, top_p=0.9)
    runs = {d: RunSpec(cfg, Deployment.parse(d), sampled, seed=7) for d in ("single", "ep2", "tp2pp2")}
    reference = _tokens(runs["single"])
    greedy = _tokens(RunSpec(cfg, Deployment(), Workload(batch_size=4, prompt_len=8, gen_len=8, seed=5), seed=7))
    assert not torch.equal(reference, greedy)  # the sampling path really ran
    assert torch.equal(_tokens(runs["single"]), reference)
    for name in ("ep2", "tp2pp2"):
        assert torch.equal(_tokens(runs[name]), reference), name
    assert torch.equal(_tokens(runs["ep2"]), reference)  # a rerun of a multi-rank deployment
