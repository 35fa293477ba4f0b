"""The local launcher ends a run whose rank fails, quickly, naming the rank, leaving no process,
and never waits past its deadline, even on a rank killed in the middle of sending its result."""

import contextlib
import functools
import ipaddress
import os
import platform
import signal
import threading
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


WRITE_SYSCALL = {"x86_64": "1", "aarch64": "64"}[platform.machine()]


def _kill_self_once_writing(tid: int) -> None:
    """SIGKILL this process as soon as thread `tid` blocks in write(2) to a file other than
    stdin/out/err: the rank's report, once the pipe to the launcher is full."""
    while True:
        with open(f"/proc/self/task/{tid}/syscall") as f:
            fields = f.read().split()
        if fields[0] == WRITE_SYSCALL and int(fields[1], 16) > 2:
            os.kill(os.getpid(), signal.SIGKILL)
        time.sleep(0.001)


def _dies_while_reporting(device) -> bytes | None:
    if dist.get_rank() != 0:
        return None
    threading.Thread(target=_kill_self_once_writing, args=(threading.get_native_id(),),
                     daemon=True).start()
    return bytes(64 << 20)  # far more than a pipe holds: the report is written in many pieces


def test_a_rank_killed_while_sending_its_result_is_a_failure_not_a_hang():
    outcome = []

    def run():
        try:
            launch(_dies_while_reporting, 2, timeout=30)
        except RankFailure as exc:
            outcome.append(exc)

    waiter = threading.Thread(target=run, daemon=True)
    waiter.start()
    waiter.join(timeout=60)  # a launcher blocked on the half-sent message never returns
    assert not waiter.is_alive(), "the launcher hung on a rank killed mid-message"
    assert outcome and outcome[0].rank == 0
    assert "process died from signal SIGKILL" in str(outcome[0])


def _address(hex_address: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
    """/proc/net/tcp's local address (host byte order per 32-bit word) -> an address."""
    raw = bytes.fromhex(hex_address)
    words = b"".join(raw[i:i + 4][::-1] for i in range(0, len(raw), 4))
    return ipaddress.ip_address(words)


def _own_socket_addresses() -> list[str]:
    """Local addresses of every TCP and UDP socket this process holds."""
    inodes = set()
    for fd in os.listdir("/proc/self/fd"):
        with contextlib.suppress(OSError):  # the listing's own descriptor is gone by now
            target = os.readlink(f"/proc/self/fd/{fd}")
            if target.startswith("socket:["):
                inodes.add(target[len("socket:["):-1])
    found = []
    for table in ("tcp", "tcp6", "udp", "udp6"):
        with open(f"/proc/self/net/{table}") as f:
            for row in f.read().splitlines()[1:]:
                fields = row.split()
                if fields[9] in inodes:
                    found.append(fields[1])
    return found


def _exposed_sockets(device) -> list:
    """Every rank's sockets bound to something other than loopback, gathered to rank 0."""
    exposed = []
    for local in _own_socket_addresses():
        host, port = local.rsplit(":", 1)
        address = _address(host)
        mapped = getattr(address, "ipv4_mapped", None)
        if not (address.is_loopback or (mapped is not None and mapped.is_loopback)):
            exposed.append(f"rank {dist.get_rank()}: {address} port {int(port, 16)}")
    gathered = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, exposed)
    return [s for rank_sockets in gathered for s in rank_sockets]


def test_a_local_run_listens_on_loopback_only():
    """No rendezvous store or gloo socket of a local run is reachable from another machine."""
    assert launch(_exposed_sockets, 3, timeout=60) == []
