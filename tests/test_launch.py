"""The local launcher ends a run whose rank fails, quickly, naming the rank, leaving no process."""

import functools
import os
import signal
import time

import pytest
import torch
import torch.distributed as dist

from expertmesh.launch import RankFailure, launch


def _faulty(kind: str, pid_dir: str, device) -> int:
    rank = dist.get_rank()
    open(os.path.join(pid_dir, str(os.getpid())), "w").close()
    x = torch.ones(4)
    dist.all_reduce(x)  # everyone is connected before the fault
    if rank == 1:
        if kind == "raise":
            raise RuntimeError("injected fault in rank 1")
        if kind == "kill":
            os.kill(os.getpid(), signal.SIGKILL)
        if kind == "stall":
            time.sleep(3600)
    dist.all_reduce(x)  # the healthy ranks wait here for the faulty one
    return int(x[0])


def _assert_all_gone(pid_dir) -> None:
    pids = [int(p) for p in os.listdir(pid_dir)]
    assert len(pids) == 3
    for pid in pids:
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)


@pytest.mark.parametrize("kind, message", [
    ("raise", "rank 1 failed: RuntimeError: injected fault in rank 1"),
    ("kill", "rank 1 failed: process died from signal SIGKILL"),
])
def test_a_failing_rank_ends_the_run_with_its_error(tmp_path, kind, message):
    t0 = time.monotonic()
    with pytest.raises(RankFailure, match=message) as info:
        launch(functools.partial(_faulty, kind, str(tmp_path)), 3, timeout=60)
    assert info.value.rank == 1
    assert time.monotonic() - t0 < 20  # far below the 60 s timeout: no waiting on dead peers
    _assert_all_gone(tmp_path)


def test_a_stalled_rank_ends_the_run_at_the_timeout(tmp_path):
    t0 = time.monotonic()
    with pytest.raises(RankFailure, match=r"timed out after 3 s; ranks \[0, 1, 2\] had not finished"):
        launch(functools.partial(_faulty, "stall", str(tmp_path)), 3, timeout=3)
    assert time.monotonic() - t0 < 15
    _assert_all_gone(tmp_path)


def test_healthy_ranks_return_rank_zeros_value(tmp_path):
    assert launch(functools.partial(_faulty, "none", str(tmp_path)), 3) == 9
