"""Under torchrun: two agents on loopback act as two nodes of two ranks each (c10d rendezvous),
run `expertmesh.cli run` across them and produce the single-process reference's tokens, and
serve a staggered stream of requests (`torchrun_serve.py`) with each request's reference
tokens; a rank killed mid-decode ends the whole job, on both nodes, non-zero, within the
timeout, leaving no process; and a torchrun rank that stalls is stopped by its own --timeout
watchdog.

These are the expensive tests (every process imports torch): four torchrun launches in all.
"""

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from expertmesh import faults
from expertmesh.config import Workload, preset
from expertmesh.deployment import Deployment
from expertmesh.engine.worker import RunSpec, run_rank
from expertmesh.launch import free_port
from test_reliability import last_line, processes_tagged, tagged_env

BATCH, PROMPT, GEN = 4, 8, 5
RUN = ["-m", "expertmesh.cli", "run", "--batch", str(BATCH), "--prompt-len", str(PROMPT),
       "--gen-len", str(GEN), "--seed", "0"]


def torchrun_two_nodes(args: list[str], env: dict, logs, limit_s: float) -> list[int]:
    """Start two torchrun agents (`--nnodes 2 --nproc-per-node 2`) as two nodes; their exit codes.

    Both agents get the same command; the c10d rendezvous on 127.0.0.1 assigns node ranks."""
    port = free_port()
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc-per-node", "2",
           "--rdzv-backend", "c10d", "--rdzv-endpoint", f"127.0.0.1:{port}", "--rdzv-id",
           f"test{port}", "--max-restarts", "0", "--monitor-interval", "0.2", *args]
    agents = [subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT)
              for log in logs]
    try:
        return [agent.wait(timeout=limit_s) for agent in agents]
    finally:
        for agent in agents:
            if agent.poll() is None:
                agent.kill()
                agent.wait()


@pytest.fixture(scope="module")
def reference_tokens():
    workload = Workload(batch_size=BATCH, prompt_len=PROMPT, gen_len=GEN, seed=0)
    return run_rank(RunSpec(preset("tiny"), Deployment(), workload, seed=0), torch.device("cpu")).tokens


@pytest.mark.parametrize("deployment", ["ep4", "tp2pp2"])
def test_two_torchrun_nodes_reproduce_the_reference(tmp_path, reference_tokens, deployment):
    out = tmp_path / "out.json"
    env, tag = tagged_env()
    logs = [open(tmp_path / f"node{i}.log", "w") for i in range(2)]
    codes = torchrun_two_nodes([*RUN, "--deployment", deployment, "--timeout", "60",
                                "--json", str(out)], env, logs, limit_s=120)
    text = "\n".join((tmp_path / f"node{i}.log").read_text() for i in range(2))
    assert codes == [0, 0], text
    result = json.loads(out.read_text())["result"]
    assert result["world_size"] == 4
    assert result["tokens"] == reference_tokens.tolist()
    if deployment == "ep4":  # torchrun's LOCAL_WORLD_SIZE made the topology 2 nodes x 2
        assert (result["exchange"]["nodes"], result["exchange"]["gpus_per_node"]) == (2, 2)
        assert result["exchange"]["cross_node_bytes"] > 0
    assert processes_tagged(tag) == []


def test_two_torchrun_nodes_serve_a_staggered_stream_with_the_reference_tokens(tmp_path):
    """The engine's control path across nodes: requests arrive at rank 0 over several steps, go
    to the EP ranks of both nodes, one is aborted; every finished request has the tokens of the
    single-device model generating it alone, and every rank's pool ends free."""
    import torchrun_serve
    from serving import naive_tokens
    from expertmesh.model.transformer import reference_model

    out = tmp_path / "serve.json"
    env, tag = tagged_env()
    logs = [open(tmp_path / f"node{i}.log", "w") for i in range(2)]
    script = str(Path(__file__).with_name("torchrun_serve.py"))
    codes = torchrun_two_nodes([script, "ep4", str(out)], env, logs, limit_s=180)
    text = "\n".join((tmp_path / f"node{i}.log").read_text() for i in range(2))
    assert codes == [0, 0], text
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
    assert processes_tagged(tag) == []


def test_a_rank_killed_under_torchrun_ends_the_job_on_both_nodes(tmp_path):
    timeout = 30
    env, tag = tagged_env(**{faults.ENV: "3:3:kill"})  # rank 3: the second node's second rank
    logs = [open(tmp_path / f"node{i}.log", "w") for i in range(2)]
    t0 = time.monotonic()
    codes = torchrun_two_nodes([*RUN, "--deployment", "ep4", "--timeout", str(timeout)], env, logs,
                               limit_s=120)
    elapsed = time.monotonic() - t0
    text = "\n".join((tmp_path / f"node{i}.log").read_text() for i in range(2))
    assert all(code != 0 for code in codes), text
    assert "exitcode: -9" in text and "local_rank: 1" in text  # torchrun names the dead worker
    assert elapsed < timeout + 30, text  # torch start-up of 6 processes on 2 cores, then the fault
    assert processes_tagged(tag) == []


def test_a_stalled_torchrun_rank_is_stopped_by_its_timeout_watchdog(tmp_path):
    """What torchrun sets (RANK, WORLD_SIZE, MASTER_*), without torchrun: the rank's watchdog,
    not a collective's timeout, ends it, whichever group or kernel it waits in."""
    env, tag = tagged_env(**{faults.ENV: "0:3:stall", "RANK": "0", "LOCAL_RANK": "0",
                             "WORLD_SIZE": "1", "MASTER_ADDR": "127.0.0.1",
                             "MASTER_PORT": str(free_port())})
    t0 = time.monotonic()
    proc = subprocess.run([sys.executable, *RUN, "--timeout", "3"], env=env, capture_output=True,
                          text=True, timeout=60)
    elapsed = time.monotonic() - t0
    assert proc.returncode == 1
    assert "error: rank 0 timed out after 3 s" in proc.stderr
    assert "expertmesh/faults.py" in proc.stderr  # where it stalled
    assert elapsed < 3 + 15
    assert processes_tagged(tag) == []
