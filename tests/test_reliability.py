"""A run ends within its timeout when a rank dies, raises, stalls or computes NaN, names the rank
and the reason, exits non-zero and leaves no process; the same seed gives the same tokens, run
after run and on every deployment, greedy or sampled.

Faults come from the test-only hook `expertmesh/faults.py` (EXPERTMESH_FAULT=RANK:STEP:KIND).
Steps 0 and 1 also run in the warm-up, so the faults here hit step 3 of the measured run.
"""

import functools
import os
import subprocess
import sys
import time
import uuid

import pytest
import torch

from expertmesh import faults
from expertmesh.cli import main
from expertmesh.config import Workload, preset
from expertmesh.deployment import Deployment
from expertmesh.engine.generate import NonFiniteError
from expertmesh.engine.worker import RunSpec, run_rank
from expertmesh.launch import launch

RUN = ["run", "--batch", "2", "--prompt-len", "8", "--gen-len", "6"]
TAG = "EXPERTMESH_TEST_TAG"


def tagged_env(**extra) -> tuple[dict, str]:
    """The environment of a subprocess whose descendants `processes_tagged` can find later."""
    tag = uuid.uuid4().hex
    return {**os.environ, TAG: tag, "OMP_NUM_THREADS": "1", **extra}, tag


def processes_tagged(tag: str, wait_s: float = 5.0) -> list[int]:
    """Live processes (other than this one) whose environment carries `tag`, after up to `wait_s`
    for them to go (a parent may still be reaping its children)."""
    needle = f"{TAG}={tag}".encode()
    deadline = time.monotonic() + wait_s
    while True:
        alive = []
        for pid in filter(str.isdigit, os.listdir("/proc")):
            try:
                with open(f"/proc/{pid}/environ", "rb") as f:
                    if needle in f.read().split(b"\0") and int(pid) != os.getpid():
                        alive.append(int(pid))
            except OSError:  # gone meanwhile, or not ours
                pass
        if not alive or time.monotonic() > deadline:
            return alive
        time.sleep(0.2)


def last_line(text: str) -> str:
    return text.strip().splitlines()[-1]


def test_fault_specs_parse_and_bad_ones_are_rejected():
    assert faults.parse("1:3:kill") == faults.Fault(1, 3, "kill")
    assert faults.parse("0:2:nan:1") == faults.Fault(0, 2, "nan", 1)
    for bad in ("1:3", "1:3:explode", "x:3:kill", "1:3:kill:2", "1:3:nan:x"):
        with pytest.raises(ValueError, match="RANK:STEP:KIND"):
            faults.parse(bad)


def test_cli_rank_killed_mid_decode_exits_nonzero_fast_and_leaves_no_process():
    env, tag = tagged_env(**{faults.ENV: "1:3:kill"})
    t0 = time.monotonic()
    proc = subprocess.run([sys.executable, "-m", "expertmesh.cli", *RUN, "--deployment", "ep2",
                           "--timeout", "10"], env=env, capture_output=True, text=True, timeout=60)
    elapsed = time.monotonic() - t0
    assert proc.returncode == 1, proc.stderr
    assert last_line(proc.stderr).startswith(
        "error: rank 1 failed: process died from signal SIGKILL"), proc.stderr
    assert elapsed < 10 + 10  # the failure, not the 10 s timeout, ends the run (+ start-up)
    assert processes_tagged(tag) == []


def _main_with_fault(fault: str, argv: list[str], monkeypatch, capfd) -> tuple[int, str, float]:
    """`expertmesh ...argv` in this process (ranks forked from it) with a fault injected."""
    env, tag = tagged_env()
    monkeypatch.setenv(TAG, tag)
    monkeypatch.setenv(faults.ENV, fault)
    t0 = time.monotonic()
    code = main(argv)
    elapsed = time.monotonic() - t0
    assert processes_tagged(tag) == []
    return code, capfd.readouterr().err, elapsed


def test_cli_rank_that_raises_is_named_with_its_error(monkeypatch, capfd):
    code, err, elapsed = _main_with_fault("1:3:raise", [*RUN, "--deployment", "ep2", "--timeout", "60"],
                                          monkeypatch, capfd)
    assert code == 1
    assert last_line(err).startswith(
        "error: rank 1 failed: RuntimeError: injected fault (EXPERTMESH_FAULT) at step 3")
    assert elapsed < 30


def test_cli_stalled_rank_ends_the_run_at_the_timeout_with_its_stack(monkeypatch, capfd):
    code, err, elapsed = _main_with_fault("1:3:stall", [*RUN, "--deployment", "ep2", "--timeout", "4"],
                                          monkeypatch, capfd)
    assert code == 1
    assert last_line(err).startswith("error: timed out after 4 s; ranks [0, 1] had not finished")
    stalled = err.split("rank 1 at the timeout:")[1]
    assert "expertmesh/faults.py" in stalled  # the stalled rank's stack shows where it waits
    assert 4 <= elapsed < 4 + 10


def test_cli_nan_in_a_pipeline_stage_names_the_stage_and_layer(monkeypatch, capfd):
    """pp2: rank 0 holds layers 0-1, rank 1 layers 2-3. NaN out of layer 1 on rank 0 makes rank
    1's logits NaN too; the run blames the first: rank 0, layer 1."""
    code, err, _ = _main_with_fault("0:3:nan:1", [*RUN, "--deployment", "pp2", "--timeout", "60"],
                                    monkeypatch, capfd)
    assert code == 1
    assert last_line(err).startswith(
        "error: rank 0 failed: NonFiniteError: non-finite hidden states at step 3; "
        "first non-finite layer output: layer 1")


@pytest.mark.parametrize("layer", [0, 2])
def test_nan_in_a_layer_is_reported_with_the_step_and_that_layer(monkeypatch, layer):
    monkeypatch.setenv(faults.ENV, f"0:4:nan:{layer}")
    spec = RunSpec(preset("tiny"), Deployment(), Workload(batch_size=2, prompt_len=8, gen_len=6))
    message = f"non-finite logits at step 4; first non-finite layer output: layer {layer}$"
    with pytest.raises(NonFiniteError, match=message):
        run_rank(spec, torch.device("cpu"))


def _tokens(spec: RunSpec) -> torch.Tensor:
    dep = spec.deployment
    if dep.world_size == 1:
        return run_rank(spec, torch.device("cpu")).tokens
    return launch(functools.partial(run_rank, spec), dep.world_size, timeout=120).tokens


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
