"""Under torchrun: two agents on loopback act as two nodes of two ranks each (c10d rendezvous),
run `expertmesh.cli run` across them and produce the single-process reference's tokens, and
serve a staggered stream of requests (`torchrun_serve.py`) with each request's reference
tokens; a rank killed mid-decode ends the whole job, on both nodes, non-zero, well within the
timeout (torchrun's propagation, not the watchdog), leaving no process; ranks die with a killed
agent; `compare` works under torchrun; a torchrun rank that stalls, or whose process group
teardown hangs, is stopped by its own watchdog.

These are the expensive tests (every process imports torch): six torchrun launches in all.
"""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from expertmesh import faults
from expertmesh.config import Workload, preset
from expertmesh.deployment import Deployment
from expertmesh.engine.spec import RunSpec
from expertmesh.engine.worker import run_rank
from expertmesh.launch import free_port
from test_reliability import FAULTY_CLI, Leftovers

BATCH, PROMPT, GEN = 4, 8, 5
WORKLOAD = ["--batch", str(BATCH), "--prompt-len", str(PROMPT), "--gen-len", str(GEN), "--seed", "0"]
RUN = ["-m", "expertmesh.cli", "run", *WORKLOAD]
FAULTY_RUN = [FAULTY_CLI, "run", *WORKLOAD]  # the CLI with fault injection enabled


def torchrun(args: list[str], env: dict, logs, nnodes: int = 2) -> list[subprocess.Popen]:
    """Start `nnodes` torchrun agents of two ranks each, as `nnodes` nodes, logging to `logs`.

    All agents get the same command; the c10d rendezvous on 127.0.0.1 assigns node ranks."""
    port = free_port()
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", str(nnodes),
           "--nproc-per-node", "2", "--rdzv-backend", "c10d", "--rdzv-endpoint", f"127.0.0.1:{port}",
           "--rdzv-id", f"test{port}", "--max-restarts", "0", "--monitor-interval", "0.2", *args]
    return [subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT) for log in logs]


def wait_all(agents: list[subprocess.Popen], limit_s: float) -> list[int]:
    """The agents' exit codes; any still running after `limit_s` is killed."""
    try:
        return [agent.wait(timeout=limit_s) for agent in agents]
    finally:
        for agent in agents:
            if agent.poll() is None:
                agent.kill()
                agent.wait()


def logs_of(tmp_path, nnodes: int = 2):
    return [open(tmp_path / f"node{i}.log", "w") for i in range(nnodes)]


def text_of(tmp_path, nnodes: int = 2) -> str:
    return "\n".join((tmp_path / f"node{i}.log").read_text() for i in range(nnodes))


@pytest.fixture(scope="module")
def reference_tokens():
    workload = Workload(batch_size=BATCH, prompt_len=PROMPT, gen_len=GEN, seed=0)
    return run_rank(RunSpec(preset("tiny"), Deployment(), workload, seed=0), torch.device("cpu")).tokens


@pytest.mark.parametrize("deployment", ["ep4", "tp2pp2"])
def test_two_torchrun_nodes_reproduce_the_reference(tmp_path, reference_tokens, deployment):
    out = tmp_path / "out.json"
    leftovers = Leftovers()
    agents = torchrun([*RUN, "--deployment", deployment, "--timeout", "60", "--json", str(out)],
                      leftovers.env(), logs_of(tmp_path))
    codes = wait_all(agents, limit_s=120)
    assert codes == [0, 0], text_of(tmp_path)
    result = json.loads(out.read_text())["result"]
    assert result["world_size"] == 4
    assert result["tokens"] == reference_tokens.tolist()
    if deployment == "ep4":  # torchrun's LOCAL_WORLD_SIZE made the topology 2 nodes x 2
        assert (result["exchange"]["nodes"], result["exchange"]["gpus_per_node"]) == (2, 2)
        assert result["exchange"]["cross_node_bytes"] > 0
    assert leftovers.alive() == []


def test_compare_under_torchrun_checks_every_deployment_against_the_reference(tmp_path, reference_tokens):
    """Each deployment runs on the torchrun ranks; the reference on rank 0 alone, afterwards."""
    out = tmp_path / "out.json"
    leftovers = Leftovers()
    agents = torchrun(["-m", "expertmesh.cli", "compare", *WORKLOAD, "--deployments", "ep2,pp2",
                       "--timeout", "60", "--json", str(out)], leftovers.env(), logs_of(tmp_path, 1),
                      nnodes=1)
    codes = wait_all(agents, limit_s=120)
    assert codes == [0], text_of(tmp_path, 1)
    data = json.loads(out.read_text())
    assert data["reference_tokens"] == reference_tokens.tolist()
    assert [r["deployment"] for r in data["results"]] == ["ep2", "pp2"]
    assert all(r["tokens"] == reference_tokens.tolist() for r in data["results"])
    assert leftovers.alive() == []


def test_two_torchrun_nodes_serve_a_staggered_stream_with_the_reference_tokens(tmp_path):
    """The engine's control path across nodes: requests arrive at rank 0 over several steps, go
    to the EP ranks of both nodes, one is aborted; every finished request has the tokens of the
    single-device model generating it alone, and every rank's pool ends free."""
    import torchrun_serve
    from serving import naive_tokens
    from expertmesh.model.transformer import reference_model

    out = tmp_path / "serve.json"
    leftovers = Leftovers()
    script = str(Path(__file__).with_name("torchrun_serve.py"))
    codes = wait_all(torchrun([script, "ep4", str(out)], leftovers.env(), logs_of(tmp_path)), limit_s=180)
    assert codes == [0, 0], text_of(tmp_path)
    data = json.loads(out.read_text())
    model = reference_model(preset("tiny"), seed=0)
    for _, request in torchrun_serve.arrivals(preset("tiny").vocab_size):
        got = data["tokens"][str(request.id)]
        want = naive_tokens(model, request.prompt, request.max_tokens)
        if request.id == torchrun_serve.ABORTED:
            assert got == want[:len(got)]
        else:
            assert got == want and data["finished"][str(request.id)] == "length"
    assert len(data["rank_stats"]) == 4
    assert all(s["blocks_free"] == torchrun_serve.ENGINE.num_blocks for s in data["rank_stats"])
    assert leftovers.alive() == []


def test_a_rank_killed_under_torchrun_ends_the_job_on_both_nodes(tmp_path):
    """torchrun stops the job as soon as a rank dies: long before the ranks' own watchdogs."""
    timeout = 300
    leftovers = Leftovers()
    t0 = time.monotonic()
    agents = torchrun([*FAULTY_RUN, "--deployment", "ep4", "--timeout", str(timeout)],
                      leftovers.env(**{faults.ENV: "3:3:kill"}),  # the second node's second rank
                      logs_of(tmp_path))
    codes = wait_all(agents, limit_s=200)
    elapsed = time.monotonic() - t0
    text = text_of(tmp_path)
    assert all(code != 0 for code in codes), text
    assert "exitcode: -9" in text and "local_rank: 1" in text  # torchrun names the dead worker
    assert "timed out" not in text, text  # no watchdog fired: propagation ended the job
    assert elapsed < 120, text  # torch start-up of 6 processes on 2 cores, then the fault
    assert leftovers.alive() == []


def test_ranks_die_with_their_killed_torchrun_agent(tmp_path):
    """A SIGKILLed agent cannot stop its workers itself: they die with it, not at their timeout."""
    leftovers = Leftovers()
    agents = torchrun([*FAULTY_RUN, "--deployment", "ep2", "--timeout", "300"],
                      leftovers.env(**{faults.ENV: "0:3:stall"}), logs_of(tmp_path, 1), nnodes=1)
    try:
        deadline = time.monotonic() + 120
        while "stalls at step 3" not in text_of(tmp_path, 1):  # both ranks are in decode
            assert time.monotonic() < deadline and agents[0].poll() is None, text_of(tmp_path, 1)
            time.sleep(0.2)
        agents[0].send_signal(signal.SIGKILL)
        agents[0].wait()
        survivors = leftovers.alive(wait_s=15)
    finally:
        wait_all(agents, limit_s=0)
        for pid in leftovers.alive(wait_s=0):  # what a failing check would leave behind
            os.kill(pid, signal.SIGKILL)
    assert survivors == [], text_of(tmp_path, 1)


def _torchrun_env(leftovers: Leftovers, **extra) -> dict:
    """What torchrun sets for a job of one rank (RANK, WORLD_SIZE, MASTER_*), without torchrun."""
    return leftovers.env(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1",
                         MASTER_PORT=str(free_port()), **extra)


def test_a_stalled_torchrun_rank_is_stopped_by_its_timeout_watchdog():
    """The rank's watchdog, not a collective's timeout, ends it, whichever group or kernel it
    waits in."""
    leftovers = Leftovers()
    t0 = time.monotonic()
    proc = subprocess.run([sys.executable, *FAULTY_RUN, "--timeout", "10"],  # 10 s: reach step 3 first
                          env=_torchrun_env(leftovers, **{faults.ENV: "0:3:stall"}),
                          capture_output=True, text=True, timeout=60)
    elapsed = time.monotonic() - t0
    assert proc.returncode == 1
    assert "error: rank 0 timed out after 10 s" in proc.stderr
    assert "expertmesh/faults.py" in proc.stderr  # where it stalled
    assert elapsed < 10 + 20
    assert leftovers.alive() == []


HANGING_TEARDOWN = """
import sys, time
import torch.distributed as dist
from expertmesh import launch
from expertmesh.cli import main
dist.destroy_process_group = lambda *args, **kwargs: time.sleep(3600)  # as NCCL's can, peer lost
launch.TEARDOWN_S = 2.0
sys.exit(main(sys.argv[1:]))
"""


def test_a_hanging_process_group_teardown_is_bounded():
    leftovers = Leftovers()
    t0 = time.monotonic()
    proc = subprocess.run([sys.executable, "-c", HANGING_TEARDOWN, "run", *WORKLOAD, "--timeout", "60"],
                          env=_torchrun_env(leftovers), capture_output=True, text=True, timeout=120)
    elapsed = time.monotonic() - t0
    assert proc.returncode == 1
    assert "error: rank 0: the process group's teardown did not finish within 2 s" in proc.stderr
    assert elapsed < 60  # start-up and the run (5-30 s), then the 2 s grace
    assert leftovers.alive() == []
