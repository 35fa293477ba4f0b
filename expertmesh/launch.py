"""Start the ranks of a run: locally (one forked process per rank) or by joining a group that
`torchrun` set up (RANK / WORLD_SIZE / LOCAL_RANK in the environment).

Where the ranks run (`local_plan`, `torchrun_device`): without torchrun, on a machine without CUDA
or under `--backend gloo`, every rank is a CPU process over gloo; on a GPU machine one rank runs on
cuda:0, and N local ranks get one GPU each and NCCL when there are N GPUs (else the run is refused
before it starts). Under torchrun a rank takes GPU `LOCAL_RANK % device_count` (SLURM may show each
process only its own GPU) and NCCL, binds gloo to the interface `rank_env` chooses, and sets NCCL's
diagnostics defaults. Every group gets the run's `timeout`, subgroups too (`group_timeout`).

Failures are bounded: when a local rank raises or dies, the launcher kills every other rank and
raises `RankFailure` naming the rank and its error; when the run outlives `timeout` seconds it
does the same, naming the ranks that had not finished, after they print their Python stacks to
stderr (where each one waits). The launcher never blocks: each rank reports through its own pipe,
read without blocking, so a rank killed mid-report is a dead rank, not a hang. No child outlives
the launcher.

A local run listens on loopback only: the ranks meet through a file store in a private temporary
directory (no rendezvous socket at all), and gloo (and NCCL's bootstrap) bind the loopback interface.
The launcher forks its ranks, so it never initializes CUDA itself first (it counts GPUs through
NVML, which does not).

Under torchrun `timeout` bounds each rank's run the same way: a rank still running after
`timeout` seconds prints its stacks and exits with code 1, and torchrun stops the others. (The
collectives' own timeout, also `timeout` in every group, would miss a hang in a kernel or in the
host code between collectives.) The process group's teardown is bounded too, and a rank dies
with its torchrun agent, as a local rank dies with the launcher.
"""

from __future__ import annotations

import contextlib
import ctypes
import faulthandler
import itertools
import math
import multiprocessing as mp
import os
import pickle
import shutil
import signal
import socket
import struct
import sys
import tempfile
import threading
import time
import traceback
from collections.abc import Callable
from datetime import timedelta
from typing import TypeVar

import torch
import torch.distributed as dist

from expertmesh import heartbeat
from expertmesh.rank_env import prepare_local_rank, prepare_torchrun_rank

T = TypeVar("T")
POLL_S = 0.05
FAILURE_GRACE_S = 1.0
JOINED_EXIT_S = 5.0  # what a joined rank gets to exit after the others (it is not a child)
STACK_DUMP_S = 0.2  # what a timed-out rank gets to print its stacks
TEARDOWN_S = 30.0  # what destroy_process_group gets (NCCL's can hang after a peer died)
_HEADER = struct.Struct("!Q")  # a rank's report: its length, then the pickled (status, payload)
_TORCHRUN_LAUNCHES = itertools.count()  # every rank makes the same calls: equal counts
_GROUP_TIMEOUT: list[timedelta] = []  # the timeout of the process group this process joined
_STORE_PATH: list[str] = []  # a local rank's file store (elastic recovery meets beside it)
DEAD_PREFIX = "dead-"  # an elastic run's launcher marks a dead rank r with a file dead-<r> there
JOINED_PREFIX = "joined-"  # rank 0 of an elastic run writes joined-<r> there: a joined rank's pid
# What gloo and NCCL say on a rank whose peer failed first.
_PEER_LOST = ("Connection closed by peer", "Connection reset by peer", "remote worker",
              "NCCL communicator was aborted")


class RankFailure(RuntimeError):
    def __init__(self, rank: int | None, message: str):
        super().__init__(f"rank {rank} failed: {message}" if rank is not None else message)
        self.rank = rank


def under_torchrun() -> bool:
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ


def cuda_devices() -> int:
    """GPUs this process sees, counted without initializing CUDA where NVML can (fork stays safe)."""
    return torch.cuda.device_count()


def default_backend() -> str:
    return "nccl" if cuda_devices() > 0 else "gloo"


def local_plan(world_size: int, backend: str | None, gpus: int) -> tuple[str, str]:
    """(device type, backend) of a run of `world_size` local ranks (no torchrun) on a machine
    with `gpus` GPUs: the CPU and gloo without GPUs or when asked (`--backend gloo`), else one GPU
    per rank and NCCL (nothing to join for a single rank). ValueError, one line, when the GPUs
    are too few or NCCL has none."""
    if backend == "gloo" or (gpus == 0 and backend is None):
        return "cpu", "gloo"
    if gpus == 0:
        raise ValueError("--backend nccl needs CUDA GPUs, one per rank; this machine has none "
                         "(drop --backend to run the ranks on the CPU over gloo)")
    if world_size > gpus:
        raise ValueError(f"{world_size} local ranks need {world_size} GPUs (one each) and this "
                         f"machine has {gpus}; start the ranks on several nodes with torchrun, run "
                         f"a smaller deployment, or add --backend gloo to run them on the CPU")
    return "cuda", "nccl"


def check_launch(world_size: int, backend: str | None, timeout: float) -> None:
    """The launch options' errors, raised before any rank starts (the CLI calls this up front)."""
    if not (math.isfinite(timeout) and timeout > 0):
        raise ValueError(f"timeout {timeout} must be a positive, finite number of seconds (--timeout)")
    if backend not in (None, "gloo", "nccl"):
        raise ValueError(f"unknown backend {backend!r}; use gloo or nccl (--backend)")
    if backend == "nccl" and cuda_devices() == 0:
        raise ValueError("--backend nccl needs CUDA GPUs, one per rank; this machine has none "
                         "(drop --backend to run the ranks on the CPU over gloo)")
    if not under_torchrun():
        local_plan(world_size, backend, cuda_devices())
    if under_torchrun() and int(os.environ["WORLD_SIZE"]) != world_size:
        raise ValueError(f"torchrun started {os.environ['WORLD_SIZE']} processes but the deployment "
                         f"needs {world_size}; set --nnodes x --nproc-per-node to {world_size}")


def launch(fn: Callable[[torch.device], T], world_size: int, backend: str | None = None,
           timeout: float = 600.0, elastic: bool = False, hang_s: float | None = None) -> T | None:
    """Run `fn(device)` on every rank of a `world_size` group; returns rank 0's value (None elsewhere).

    `elastic` (local runs only): a rank other than 0 that dies or fails does not end the run; the
    launcher says so on stderr and marks it dead beside the store (`dead_ranks`), where the
    survivors' `elastic/recovery.py` looks, and waits for the others. Rank 0 failing still ends
    the run. `hang_s` (with `elastic`): every rank keeps a heartbeat (`heartbeat.py`), and the
    launcher SIGKILLs a rank hung for `hang_s` seconds and says so; it is then a dead rank (rank
    0 too, which ends the run)."""
    check_launch(world_size, backend, timeout)
    if hang_s is not None:
        heartbeat.check_hang_timeout(hang_s, timeout)
    if under_torchrun():
        return _join_torchrun(fn, backend, timeout)
    kind, backend = local_plan(world_size, backend, cuda_devices())
    if kind == "cuda" and torch.cuda.is_initialized():
        raise RuntimeError("this process initialized CUDA before forking its ranks, which then "
                           "cannot use it; start multi-GPU runs from a fresh process or torchrun")
    return _run_local(fn, world_size, kind, backend, timeout, elastic, hang_s if elastic else None)


def local_store_path() -> str | None:
    """This local rank's file store (None under torchrun or in the launcher)."""
    return _STORE_PATH[0] if _STORE_PATH else None


def dead_ranks(store_path: str) -> dict[int, str]:
    """The ranks an elastic launcher marked dead beside `store_path`: rank -> how it ended."""
    folder = os.path.dirname(store_path)
    out = {}
    for name in os.listdir(folder):
        if name.startswith(DEAD_PREFIX) and name[len(DEAD_PREFIX):].isdigit():
            with open(os.path.join(folder, name)) as f:
                out[int(name[len(DEAD_PREFIX):])] = f.read()
    return out


def write_marker(path: str, data: bytes) -> None:
    """Written whole, then renamed: a reader sees the marker complete or not at all."""
    partial = os.path.join(os.path.dirname(path), "." + os.path.basename(path))
    with open(partial, "wb") as f:
        f.write(data)
    os.replace(partial, path)


def _mark_dead(store_path: str, rank: int, message: str) -> None:
    write_marker(os.path.join(os.path.dirname(store_path), f"{DEAD_PREFIX}{rank}"), message.encode())


def joined_ranks(store_path: str) -> dict[int, int]:
    """The ranks that joined an elastic run (`serve --join`), marked beside `store_path`: rank -> pid.
    They are not this launcher's children: it watches them by pid (`_watch_joined`)."""
    folder = os.path.dirname(store_path)
    out = {}
    for name in os.listdir(folder):
        if name.startswith(JOINED_PREFIX) and name[len(JOINED_PREFIX):].isdigit():
            with open(os.path.join(folder, name)) as f:
                out[int(name[len(JOINED_PREFIX):])] = int(f.read())
    return out


def process_running(pid: int) -> bool:
    """`pid` exists and is not a zombie (its parent, not this process, reaps it)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rpartition(")")[2].split()[0] != "Z"
    except (FileNotFoundError, ProcessLookupError, IndexError):
        return False


def init_group(backend: str, store, rank: int, world_size: int, timeout: float,
               device: torch.device) -> None:
    """The default process group, bound to this rank's GPU under NCCL (`device_id`: NCCL sets up
    its communicator now, on that GPU, and new groups split from it); its `timeout` is kept for
    every subgroup (`group_timeout`)."""
    if device.type == "cuda":
        torch.cuda.set_device(device)
    limit = timedelta(seconds=timeout)
    dist.init_process_group(backend, store=store, rank=rank, world_size=world_size, timeout=limit,
                            device_id=device if device.type == "cuda" else None)
    _GROUP_TIMEOUT[:] = [limit]


def group_timeout() -> timedelta | None:
    """The run's timeout, for `new_group` (whose default is 10 or 30 minutes, not the run's)."""
    return _GROUP_TIMEOUT[0] if _GROUP_TIMEOUT else None


def _join_torchrun(fn, backend, timeout):
    _die_with_agent()
    backend = backend or default_backend()
    device = torchrun_device(backend)
    prepare_torchrun_rank(backend)
    rank = int(os.environ["RANK"])
    watchdog = _watchdog(timeout, f"rank {rank} timed out after {timeout:.0f} s (raise --timeout "
                                  f"if the run is just slow)")
    # A fresh key space per launch: `compare` launches once per deployment in one process, and
    # a second group on the same keys would find the first one's (closed) gloo addresses.
    store, rank, world_size = next(dist.rendezvous("env://", timeout=timedelta(seconds=timeout)))
    store = dist.PrefixStore(f"expertmesh/launch{next(_TORCHRUN_LAUNCHES)}", store)
    init_group(backend, store, rank, world_size, timeout, device)
    try:
        return fn(device)
    finally:
        watchdog.cancel()
        grace = min(timeout, TEARDOWN_S)
        teardown = _watchdog(grace, f"rank {rank}: the process group's teardown did not finish "
                                    f"within {grace:.0f} s")
        dist.destroy_process_group()
        teardown.cancel()


def torchrun_device(backend: str | None, gpus: int | None = None) -> torch.device:
    """This torchrun rank's device: under NCCL GPU `LOCAL_RANK % gpus` (all of the node's GPUs
    visible: its own; one visible per process, as SLURM may set it: that one), else the CPU."""
    if (backend or default_backend()) == "nccl":
        gpus = cuda_devices() if gpus is None else gpus
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)) % max(gpus, 1))
    return torch.device("cpu")


def local_device(world_size: int, backend: str | None) -> torch.device:
    """Where a run of `world_size` ranks puts a rank that runs in this process (one rank, or
    compare's reference): cuda:0 when its ranks go on GPUs, else the CPU."""
    if under_torchrun():
        return torchrun_device(backend)
    kind, _ = local_plan(world_size, backend, cuda_devices())
    return torch.device(kind, 0) if kind == "cuda" else torch.device("cpu")


def _watchdog(seconds: float, message: str) -> threading.Timer:
    """A started timer that, unless cancelled, ends this process after `seconds` with `message`."""
    timer = threading.Timer(seconds, _expire, args=(message,))
    timer.daemon = True
    timer.start()
    return timer


def _expire(message: str) -> None:
    """A torchrun rank overran its time: say so, show where every thread waits, exit."""
    print(f"error: {message}; its stacks follow", file=sys.stderr, flush=True)
    faulthandler.dump_traceback(file=2, all_threads=True)
    os._exit(1)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _die_with_parent() -> None:
    """Ask Linux to SIGKILL this process if its parent dies, so no rank is orphaned."""
    if sys.platform.startswith("linux"):
        PR_SET_PDEATHSIG = 1
        ctypes.CDLL(None).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)


def _die_with_agent() -> None:
    """A torchrun rank dies with its agent, which started it (TORCHELASTIC_RUN_ID says so) as
    its direct child, instead of holding its GPU until the watchdog fires."""
    if "TORCHELASTIC_RUN_ID" not in os.environ:
        return
    agent = os.getppid()
    _die_with_parent()
    if os.getppid() != agent:  # the agent died before the request took effect
        os._exit(1)


def _child(rank, world_size, store_path, fn, report_fd, kind, backend, timeout, beats=None):
    _die_with_parent()
    if beats is not None:
        heartbeat.start(beats, rank)
    # Ctrl-C reaches every process of the terminal's group: the launcher alone handles it.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    # The launcher's request at a timeout; to fd 2, which exists even when sys.stderr is replaced.
    faulthandler.register(signal.SIGUSR1, file=2, all_threads=True)
    torch.set_num_threads(1)  # ranks share the cores: one thread each avoids oversubscription
    prepare_local_rank(backend)  # else gloo binds what the hostname resolves to
    device = torch.device(kind, rank) if kind == "cuda" else torch.device("cpu")
    ok = False
    try:
        _STORE_PATH[:] = [store_path]
        store = dist.FileStore(store_path, world_size)
        init_group(backend, store, rank, world_size, timeout, device)
        result = fn(device)
        report = pickle.dumps(("ok", result if rank == 0 else None))
        ok = True
    except BaseException as exc:  # report anything, then exit
        traceback.print_exc(file=sys.stderr)
        report = pickle.dumps(("error", f"{type(exc).__name__}: {exc}"))
    with os.fdopen(report_fd, "wb") as pipe:
        pipe.write(_HEADER.pack(len(report)) + report)
    os._exit(0 if ok else 1)  # skip teardown that could wait on dead peers


class _Report:
    """What one rank wrote to its pipe so far, read without ever blocking."""

    def __init__(self, fd: int):
        self.fd, self.data = fd, bytearray()
        os.set_blocking(fd, False)

    def read(self) -> tuple[str, object] | None:
        """The rank's (status, payload) once all of it arrived, else None."""
        with contextlib.suppress(BlockingIOError):
            while chunk := os.read(self.fd, 1 << 20):
                self.data += chunk
        if len(self.data) < _HEADER.size:
            return None
        (size,) = _HEADER.unpack_from(self.data)
        if len(self.data) < _HEADER.size + size:
            return None
        return pickle.loads(memoryview(self.data)[_HEADER.size:])


def _run_local(fn, world_size, kind, backend, timeout, elastic=False, hang_s=None):
    ctx = mp.get_context("fork")
    private = tempfile.mkdtemp(prefix="expertmesh-")  # mode 0700: the store is this user's alone
    procs, reports = [], []
    beats = heartbeat.Beats(world_size) if hang_s is not None else None
    try:
        for r in range(world_size):
            read_fd, write_fd = os.pipe()
            reports.append(_Report(read_fd))
            procs.append(ctx.Process(target=_child, daemon=True, args=(
                r, world_size, os.path.join(private, "store"), fn, write_fd, kind, backend, timeout, beats)))
            procs[-1].start()
            os.close(write_fd)  # the rank holds the only write end
        store = os.path.join(private, "store")
        hangs = (beats, hang_s) if beats is not None else None
        return _wait(procs, reports, timeout, store if elastic else None, hangs)
    finally:
        for p in procs:
            if p.is_alive():
                p.kill()
        if elastic:  # a joined rank goes with the run too: it stops on its own after a clean end
            joined = joined_ranks(os.path.join(private, "store")).values()
            grace = time.monotonic() + JOINED_EXIT_S
            while any(map(process_running, joined)) and time.monotonic() < grace:
                time.sleep(POLL_S)
            for pid in filter(process_running, joined):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
        for p in procs:
            p.join(timeout=5)
        for report in reports:
            os.close(report.fd)
        shutil.rmtree(private, ignore_errors=True)


def _wait(procs, reports, timeout, elastic_store=None, hangs=None):
    """Rank 0's result once every rank reported; `RankFailure` on a failure or at the deadline.
    With `elastic_store`, a failed rank other than 0 is marked dead there instead (`launch`).
    With `hangs` (`heartbeat.Beats`, seconds), a rank hung that long is killed, and fails as hung."""
    world_size = len(procs)
    deadline = time.monotonic() + timeout
    done: dict[int, object] = {}
    failures: dict[int, str] = {}
    hung: dict[int, str] = {}  # rank -> why it was killed
    while len(done) < world_size:
        if hangs is not None:
            _kill_hung(procs, hangs, hung, set(done) | set(failures))
        _poll(procs, reports, done, failures)
        failures.update({r: f"{why}; killed" for r, why in hung.items() if r in failures})
        if elastic_store is not None and 0 not in failures:
            for rank in [r for r, message in failures.items() if r not in done]:
                print(f"rank {rank} failed: {failures[rank]}; the other ranks carry on without it "
                      f"(--elastic)", file=sys.stderr, flush=True)
                _mark_dead(elastic_store, rank, failures[rank])
                done[rank] = None
            failures.clear()
            _watch_joined(elastic_store)
        if failures:
            # One rank's fault makes its peers fail too ("connection closed by peer"): wait a
            # moment for the whole picture, then blame the root cause, not a bystander.
            grace = time.monotonic() + FAILURE_GRACE_S
            while time.monotonic() < grace and len(done) + len(failures) < world_size:
                time.sleep(POLL_S)
                _poll(procs, reports, done, failures)
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
    return done[0]


def _kill_hung(procs, hangs, hung: dict[int, str], ended: set[int]) -> None:
    """SIGKILL every rank the heartbeats say is hung (once), saying why on stderr."""
    beats, hang_s = hangs
    for rank, p in enumerate(procs):
        if rank in ended or rank in hung or (why := beats.verdict(rank, hang_s)) is None:
            continue
        print(f"rank {rank} {why}; killed (--hang-timeout {hang_s:g})", file=sys.stderr, flush=True)
        hung[rank] = why
        with contextlib.suppress(ProcessLookupError):  # it may have just exited
            os.kill(p.pid, signal.SIGKILL)


def _watch_joined(store_path: str) -> None:
    """Mark dead a joined rank whose process ended, as `_wait` does its own ranks."""
    dead = dead_ranks(store_path)
    for rank, pid in joined_ranks(store_path).items():
        if rank not in dead and not process_running(pid):
            print(f"rank {rank} (joined, pid {pid}) ended; the other ranks carry on without it "
                  f"(--elastic)", file=sys.stderr, flush=True)
            _mark_dead(store_path, rank, f"joined process {pid} ended")


def _poll(procs, reports, done: dict, failures: dict) -> None:
    """Collect complete reports, and ranks that exited without one."""
    for rank, (p, report) in enumerate(zip(procs, reports)):
        if rank in done or rank in failures:
            continue
        exited = p.exitcode is not None  # before reading: all it wrote is in the pipe by then
        message = report.read()
        if message is not None:
            status, payload = message
            (done if status == "ok" else failures)[rank] = payload
        elif exited:
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
