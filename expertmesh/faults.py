"""Fault injection for tests only: make one rank fail at one generation step, on purpose.

Not a user feature, and impossible outside the tests: the environment variable

    EXPERTMESH_FAULT=RANK:STEP:KIND[:LAYER]      e.g. EXPERTMESH_FAULT=1:3:kill

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
server's timing would make a matter of luck). The static loop (`engine/generate.py`) calls `at_step`
once per step of every `generate` call, the 2-step warm-up included, so a fault at step >= 2 hits the measured run
(and the warm-up passes through it first, at steps 0 and 1); the serving engine
(`engine/engine.py`) calls it once per engine step, counted by its runner. Disabled, `at_step` does nothing.
A stall or a spin prints one line to stderr when it starts, so that a test knows the run reached it.
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

ENV = "EXPERTMESH_FAULT"
KINDS = ("raise", "kill", "stall", "spin", "nan", "counters")
STALL_S = 3600.0
ENABLED = False  # set only by the tests (see above)
_poisoned: list = []  # (model, check) of an active nan fault


@dataclass(frozen=True)
class Fault:
    rank: int
    step: int
    kind: str
    layer: int | None = None


@functools.lru_cache(maxsize=8)
def parse(text: str) -> Fault:
    """`"1:3:kill"` -> Fault(rank=1, step=3, kind="kill"); `"0:2:nan:1"` poisons layer 1."""
    parts = text.split(":")
    try:
        if len(parts) not in (3, 4) or parts[2] not in KINDS:
            raise ValueError
        layer = int(parts[3]) if len(parts) == 4 else None
        if layer is not None and parts[2] != "nan":
            raise ValueError
        return Fault(int(parts[0]), int(parts[1]), parts[2], layer)
    except ValueError:
        raise ValueError(f"{ENV}={text!r} must be RANK:STEP:KIND with KIND one of "
                         f"{', '.join(KINDS)} (nan takes an optional :LAYER)") from None


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
