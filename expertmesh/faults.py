"""Fault injection for tests only: make one rank fail at one generation step, on purpose.

Not a user feature, and impossible outside the tests: the environment variable

    EXPERTMESH_FAULT=RANK:STEP:KIND[:LAYER]      e.g. EXPERTMESH_FAULT=1:3:kill
    EXPERTMESH_FAULT=RANK:STEP:cut:VICTIM        e.g. EXPERTMESH_FAULT=4:5:cut:5

is honoured only in a process where `ENABLED` was set to True, in memory, before the run (the
ranks a local run forks inherit it). No expertmesh entry point sets it: the tests do, in their
own process, or start runs through `tests/faulty_cli.py`, which sets it and then calls the CLI.
So a stray variable in a production environment (or one an attacker can set) does nothing.

The reliability tests use it to check that the run ends within its timeout, names the rank and
leaves no process behind. KIND is `raise` (a RuntimeError), `kill` (SIGKILL to itself), `stall`
(sleep for an hour), `spin` (a Python loop for an hour: a hung rank that keeps the CPU busy), `nan` (the output of LAYER, default the first layer the rank holds, becomes
NaN for that step, which the decode loop's finite check must report) or `counters` (SIGKILL on
entering the counters' collective, `server/rank_counters.py`, the first time at or after STEP that
this rank holds a request: a death between a step and the collective after it, which an idle
server's timing would make a matter of luck); `cut` is below. The static loop (`engine/generate.py`) calls `at_step`
once per step of every `generate` call, the 2-step warm-up included, so a fault at step >= 2 hits the measured run
(and the warm-up passes through it first, at steps 0 and 1); the serving engine
(`engine/engine.py`) calls it once per engine step, counted by its runner. Disabled, `at_step` does nothing.
A stall or a spin prints one line to stderr when it starts, so that a test knows the run reached it.

`cut` cuts an engine step where a pipeline's stages part (`elastic/slots.py`): the serving
engine's reporting rank RANK (a last pipeline stage), at the STEP-th step at which it sampled
tokens (from 1, the warm-up's included; steps that sample nothing are not counted), right after
its scheduler recorded them and before the step's all-gather, SIGKILLs rank VICTIM (another
pipeline's: a rank of a local run, its launcher's children being the ranks in rank order) and
waits until it is gone; the all-gather then fails, the step's tokens having reached no other
rank. Only while no rank was lost (later the ranks are renumbered). The engine calls
`after_sampling` there.
"""

from __future__ import annotations

import functools
import os
import signal
import sys
import time
from dataclasses import dataclass

import torch
import torch.distributed as dist

from expertmesh.launch import dead_ranks, local_store_path, process_running

ENV = "EXPERTMESH_FAULT"
KINDS = ("raise", "kill", "stall", "spin", "nan", "counters", "cut")
GONE_S = 30.0  # how long a cut waits for its victim to be gone
STALL_S = 3600.0
ENABLED = False  # set only by the tests (see above)
_poisoned: list = []  # (model, check) of an active nan fault
_sampled = 0  # the steps at which this rank sampled tokens (a cut counts them)


@dataclass(frozen=True)
class Fault:
    rank: int
    step: int
    kind: str
    layer: int | None = None
    victim: int | None = None


@functools.lru_cache(maxsize=8)
def parse(text: str) -> Fault:
    """`"1:3:kill"` -> Fault(rank=1, step=3, kind="kill"); `"0:2:nan:1"` poisons layer 1;
    `"4:5:cut:5"` -> Fault(4, 5, "cut", victim=5)."""
    parts = text.split(":")
    try:
        if len(parts) not in (3, 4) or parts[2] not in KINDS:
            raise ValueError
        extra = int(parts[3]) if len(parts) == 4 else None
        if (extra is None and parts[2] == "cut") or (extra is not None and parts[2] not in ("nan", "cut")):
            raise ValueError
        if parts[2] == "cut":
            return Fault(int(parts[0]), int(parts[1]), "cut", victim=extra)
        return Fault(int(parts[0]), int(parts[1]), parts[2], extra)
    except ValueError:
        raise ValueError(f"{ENV}={text!r} must be RANK:STEP:KIND with KIND one of "
                         f"{', '.join(KINDS)} (nan takes an optional :LAYER, cut a :VICTIM)") from None


def _mine() -> Fault | None:
    """The fault of `EXPERTMESH_FAULT` if enabled and it names this rank."""
    text = os.environ.get(ENV)
    if not ENABLED or not text:
        return None
    fault = parse(text)
    return fault if fault.rank == (dist.get_rank() if dist.is_initialized() else 0) else None


def at_step(step: int, model: torch.nn.Module) -> None:
    """Inject the fault of `EXPERTMESH_FAULT` if enabled and it names this rank and `step`."""
    while _poisoned:  # a nan fault lasts one step
        held, check = _poisoned.pop()
        held.after_layer.remove(check)
    fault = _mine()
    if fault is None or fault.step != step or fault.kind == "counters":
        return
    rank = fault.rank
    if fault.kind == "raise":
        raise RuntimeError(f"injected fault ({ENV}) at step {step}")
    if fault.kind == "kill":
        os.kill(os.getpid(), signal.SIGKILL)
    if fault.kind == "stall":
        print(f"injected fault ({ENV}): rank {rank} stalls at step {step}", file=sys.stderr, flush=True)
        time.sleep(STALL_S)
    if fault.kind == "spin":
        print(f"injected fault ({ENV}): rank {rank} spins at step {step}", file=sys.stderr, flush=True)
        end = time.monotonic() + STALL_S
        while time.monotonic() < end:
            pass
    if fault.kind == "nan":
        _poison(model, fault.layer)


def after_sampling(outputs: list) -> None:
    """The serving engine's reporting rank, after its scheduler recorded the step's `outputs`:
    a `cut` fault (see above) if enabled and it names this rank and this sampling step."""
    global _sampled
    fault = _mine()
    if fault is None or fault.kind != "cut" or not outputs:
        return
    if (store := local_store_path()) is None or dead_ranks(store):  # renumbered: not RANK's count
        return
    _sampled += 1
    if _sampled != fault.step:
        return
    launcher = os.getppid()
    with open(f"/proc/{launcher}/task/{launcher}/children") as f:
        ranks = sorted(int(p) for p in f.read().split())
    if len(ranks) != dist.get_world_size():
        raise RuntimeError(f"{ENV}: a cut needs the ranks of a local run, not {ranks}")
    victim = ranks[fault.victim]
    os.kill(victim, signal.SIGKILL)
    end = time.monotonic() + GONE_S
    while process_running(victim) and time.monotonic() < end:
        time.sleep(0.01)


def at_counters(step: int, busy: bool) -> None:
    """The `counters` fault, if it names this rank: SIGKILL when `busy` (holding a request) at or
    after `step`."""
    fault = _mine()
    if fault is not None and fault.kind == "counters" and busy and step >= fault.step:
        os.kill(os.getpid(), signal.SIGKILL)


def _poison(model: torch.nn.Module, layer: int | None) -> None:
    """Make the outputs of one decoder layer NaN until the next step (every micro-batch)."""
    layers = model.layers
    name = str(layer) if layer is not None else next(iter(layers))
    if name not in layers:
        raise ValueError(f"{ENV}: this rank holds layers {list(layers)}, not layer {layer}")
    def poison(index: int, out: torch.Tensor) -> None:
        if index == int(name):
            out.fill_(float("nan"))

    # first: the poison runs before the finite check sees the output
    model.after_layer.insert(0, poison)
    _poisoned.append((model, poison))
