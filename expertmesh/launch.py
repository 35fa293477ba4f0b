"""Start the ranks of a run: locally (one forked process per rank, gloo on loopback) or by joining
a group that `torchrun` set up (RANK / WORLD_SIZE / LOCAL_RANK in the environment; NCCL and one
GPU per rank when CUDA is available).

Failures are bounded: when a local rank raises or dies, the launcher kills every other rank and
raises `RankFailure` naming the rank and its error; when the run outlives `timeout` seconds it
does the same, naming the ranks that had not finished, after they print their Python stacks to
stderr (where each one waits). No child outlives the launcher.

Under torchrun `timeout` bounds each rank's run the same way: a rank still running after
`timeout` seconds prints its stacks and exits with code 1, and torchrun stops the others. (The
collectives' own timeout, also `timeout`, would miss a hang in a group made by `new_group` with
its default 30 min, or in a kernel.)
"""

from __future__ import annotations

import contextlib
import ctypes
import faulthandler
import multiprocessing as mp
import os
import pickle
import signal
import socket
import sys
import threading
import time
import traceback
from collections.abc import Callable
from datetime import timedelta
from typing import TypeVar

import torch
import torch.distributed as dist

T = TypeVar("T")
POLL_S = 0.05
FAILURE_GRACE_S = 1.0
STACK_DUMP_S = 0.2  # what a timed-out rank gets to print its stacks
# What gloo and NCCL say on a rank whose peer failed first.
_PEER_LOST = ("Connection closed by peer", "Connection reset by peer", "remote worker",
              "NCCL communicator was aborted")


class RankFailure(RuntimeError):
    def __init__(self, rank: int | None, message: str):
        super().__init__(f"rank {rank} failed: {message}" if rank is not None else message)
        self.rank = rank


def under_torchrun() -> bool:
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ


def default_backend() -> str:
    return "nccl" if torch.cuda.is_available() else "gloo"


def launch(fn: Callable[[torch.device], T], world_size: int, backend: str | None = None,
           timeout: float = 600.0) -> T | None:
    """Run `fn(device)` on every rank of a `world_size` group; returns rank 0's value (None elsewhere)."""
    if not timeout > 0:
        raise ValueError(f"timeout {timeout} must be a positive number of seconds (--timeout)")
    if backend not in (None, "gloo", "nccl"):
        raise ValueError(f"unknown backend {backend!r}; use gloo or nccl (--backend)")
    if backend == "nccl" and not (under_torchrun() and torch.cuda.is_available()):
        raise ValueError("--backend nccl needs ranks started by torchrun, one per visible CUDA GPU; "
                         "local ranks use gloo")
    if under_torchrun():
        return _join_torchrun(fn, world_size, backend, timeout)
    return _run_local(fn, world_size, backend or "gloo", timeout)


def _join_torchrun(fn, world_size, backend, timeout):
    env_world = int(os.environ["WORLD_SIZE"])
    if env_world != world_size:
        raise ValueError(f"torchrun started {env_world} processes but the deployment needs "
                         f"{world_size}; set --nnodes x --nproc-per-node to {world_size}")
    backend = backend or default_backend()
    device = torch.device("cpu")
    if backend == "nccl":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        torch.cuda.set_device(device)
    watchdog = threading.Timer(timeout, _expire, args=(int(os.environ["RANK"]), timeout))
    watchdog.daemon = True
    watchdog.start()
    dist.init_process_group(backend, timeout=timedelta(seconds=timeout))
    try:
        return fn(device)
    finally:
        watchdog.cancel()
        dist.destroy_process_group()


def _expire(rank: int, timeout: float) -> None:
    """A torchrun rank outlived --timeout: say so, show where every thread waits, exit."""
    print(f"error: rank {rank} timed out after {timeout:.0f} s (raise --timeout if the run is just "
          f"slow); its stacks follow", file=sys.stderr, flush=True)
    faulthandler.dump_traceback(file=2, all_threads=True)
    os._exit(1)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _die_with_parent() -> None:
    """Ask Linux to SIGKILL this process if the launcher dies, so no rank is orphaned."""
    if sys.platform.startswith("linux"):
        PR_SET_PDEATHSIG = 1
        ctypes.CDLL(None).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)


def _child(rank, world_size, port, fn, queue, backend, timeout):
    _die_with_parent()
    # The launcher's request at a timeout; to fd 2, which exists even when sys.stderr is replaced.
    faulthandler.register(signal.SIGUSR1, file=2, all_threads=True)
    torch.set_num_threads(1)  # ranks share the cores: one thread each avoids oversubscription
    status, payload = "ok", None
    try:
        dist.init_process_group(backend, init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                                world_size=world_size, timeout=timedelta(seconds=timeout))
        result = fn(torch.device("cpu"))
        payload = pickle.dumps(result) if rank == 0 else None
    except BaseException as exc:  # report anything, KeyboardInterrupt included, then exit
        traceback.print_exc(file=sys.stderr)
        status, payload = "error", f"{type(exc).__name__}: {exc}"
    queue.put((rank, status, payload))
    os._exit(0 if status == "ok" else 1)  # skip teardown that could wait on dead peers


def _run_local(fn, world_size, backend, timeout):
    ctx = mp.get_context("fork")
    queue = ctx.SimpleQueue()
    port = free_port()
    procs = [ctx.Process(target=_child, args=(r, world_size, port, fn, queue, backend, timeout),
                         daemon=True) for r in range(world_size)]
    for p in procs:
        p.start()
    deadline = time.monotonic() + timeout
    done: dict[int, object] = {}
    failures: dict[int, str] = {}
    try:
        while len(done) < world_size:
            _poll(procs, queue, done, failures)
            if failures:
                # One rank's fault makes its peers fail too ("connection closed by peer"): wait a
                # moment for the whole picture, then blame the root cause, not a bystander.
                grace = time.monotonic() + FAILURE_GRACE_S
                while time.monotonic() < grace and len(done) + len(failures) < world_size:
                    time.sleep(POLL_S)
                    _poll(procs, queue, done, failures)
                raise _root_cause(failures)
            if time.monotonic() > deadline:
                missing = [r for r in range(world_size) if r not in done]
                for r in missing:  # one at a time, so that their stacks do not interleave
                    print(f"rank {r} at the timeout:", file=sys.stderr, flush=True)
                    with contextlib.suppress(ProcessLookupError):  # it may have just exited
                        os.kill(procs[r].pid, signal.SIGUSR1)
                    time.sleep(STACK_DUMP_S)
                raise RankFailure(None, f"timed out after {timeout:.0f} s; ranks {missing} had not "
                                        f"finished (raise --timeout if the run is just slow; their "
                                        f"stacks are on stderr)")
            time.sleep(POLL_S)
        for p in procs:
            p.join()
        return pickle.loads(done[0])
    finally:
        for p in procs:
            if p.is_alive():
                p.kill()
        for p in procs:
            p.join(timeout=5)


def _poll(procs, queue, done: dict, failures: dict) -> None:
    """Collect reports from the queue, and ranks that exited without one."""
    while not queue.empty():
        rank, status, payload = queue.get()
        if status == "error":
            failures[rank] = payload
        else:
            done[rank] = payload
    for rank, p in enumerate(procs):
        if rank not in done and rank not in failures and p.exitcode is not None and queue.empty():
            failures[rank] = _describe_exit(p.exitcode)


def _root_cause(failures: dict[int, str]) -> RankFailure:
    """Prefer a rank that died or raised on its own over ranks that lost a peer."""
    def secondary(message: str) -> bool:
        return any(s in message for s in _PEER_LOST)
    rank = min(failures, key=lambda r: (secondary(failures[r]), r))
    others = len(failures) - 1
    tail = f" ({others} other rank{'s' if others > 1 else ''} failed after it)" if others else ""
    return RankFailure(rank, failures[rank] + tail)


def _describe_exit(code: int) -> str:
    if code < 0:
        return f"process died from signal {signal.Signals(-code).name}"
    return f"process exited with code {code} without reporting"
