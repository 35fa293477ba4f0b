"""Which kernel computes the experts' matmuls, chosen by measurement per machine, dtype and shape.

`GroupedExperts` multiplies rows grouped by expert, x `[N, D]` with counts per expert `[E]`, by
stacked weights `[E, out, in]`. Two kernels do it:

- `grouped`: one `torch._grouped_mm` over the row offsets (they stay on the device);
- `loop`: one `F.linear` per expert over its rows (needs the counts as Python ints).

Neither is always faster: on CPU the grouped kernel's bf16 path can lose to the loop's, and on
CUDA the grouped kernel needs Hopper. `--expert-kernel auto` times both once for the model's
(d_model, hidden, dtype) at a few rows-per-expert buckets and keeps the faster per bucket, in a
JSON file per machine (`$EXPERTMESH_CACHE`, else `~/.cache/expertmesh`), so a later start reads
it instead of timing. A padded `torch.bmm` was measured too and left out: 0.7-0.8x the loop's
speed from 32 rows per expert on in fp32 and bf16 (it computes every expert at the largest
expert's count), and its fp32 sums differ in the last bits from the other two, which agree
bitwise on CPU.

Rank 0 decides and every rank takes its plan (`engine/shard.py: install_expert_kernels`), so
timing noise never makes ranks differ.
"""

from __future__ import annotations

import json
import math
import os
import platform
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

KERNELS = ("grouped", "loop")
SETTINGS = ("auto", *KERNELS)
BUCKETS = (4, 32, 256)  # rows per expert timed by `auto`; larger calls take the largest's choice
TIMED_EXPERTS = 2       # experts per timed call
CACHE_FILE = "expert_kernels.json"

Timer = Callable[[str, int, Callable[[], object]], float]


@dataclass(frozen=True)
class KernelPlan:
    """Rows per expert -> kernel. `choices`: (rows per expert, kernel) pairs; a call takes the
    kernel of the bucket nearest its mean rows per expert on a log scale (ties: the smaller)."""

    choices: tuple[tuple[int, str], ...]

    def pick(self, rows: int, experts: int) -> str:
        """The kernel for `rows` rows `[rows, D]` over `experts` experts (a host-side shape: no
        device value is read)."""
        mean = max(rows / max(experts, 1), 1.0)
        return min(self.choices, key=lambda c: (abs(math.log2(mean / c[0])), c[0]))[1]

    def to_json(self) -> dict:
        return {str(rows): kernel for rows, kernel in self.choices}

    @staticmethod
    def from_json(data: dict) -> KernelPlan:
        choices = tuple(sorted((int(rows), kernel) for rows, kernel in data.items()))
        if not choices or any(kernel not in KERNELS for _, kernel in choices):
            raise ValueError(f"not a kernel plan: {data!r}")
        return KernelPlan(choices)


def fixed(kernel: str) -> KernelPlan:
    """The plan of `--expert-kernel grouped` or `loop`: that kernel at every size."""
    return KernelPlan(((1, kernel),))


DEFAULT = fixed("grouped")  # what GroupedExperts does until a plan is installed


def grouped_mm_applies(x: torch.Tensor, hidden: int) -> bool:
    """Whether `torch._grouped_mm` takes x `[N, D]` and hidden activations `[N, hidden]`.

    The CUDA kernel takes bf16 only (and needs Hopper or newer); the CPU one takes any float.
    Both reject operands whose row stride (d_model or hidden elements) is not a multiple of
    16 bytes ("strides should be multiple of 16 bytes")."""
    aligned = all(n * x.element_size() % 16 == 0 for n in (x.shape[-1], hidden))
    cuda_ok = (x.device.type == "cuda" and x.dtype == torch.bfloat16
               and torch.cuda.get_device_capability(x.device) >= (9, 0))
    return hasattr(torch, "_grouped_mm") and aligned and (x.device.type == "cpu" or cuda_ok)


def grouped(x: torch.Tensor, w: torch.Tensor, ends: torch.Tensor) -> torch.Tensor:
    """x `[N, in]` grouped by expert, w `[E, out, in]`, ends `[E]` int32 (cumulative counts)
    -> `[N, out]` (rows past ends[-1]: undefined)."""
    return torch._grouped_mm(x, w.transpose(-2, -1), offs=ends)


def loop(x: torch.Tensor, w: torch.Tensor, splits: list[int]) -> torch.Tensor:
    """x `[N, in]` grouped by expert, w `[E, out, in]`, rows per expert `splits` (ints)
    -> `[sum(splits), out]`: the rows past them are not computed."""
    parts = x[:sum(splits)].split(splits)
    return torch.cat([F.linear(p, w[e]) for e, p in enumerate(parts)])  # faster than p @ w.T on CPU


def time_call(kernel: str, rows: int, fn: Callable[[], object]) -> float:
    """Seconds of one call of `fn`: the best of two after a warm-up (the best: other work on the
    machine only ever adds time). `kernel` and `rows` name the call, for a fake timer."""
    sync = torch.cuda.synchronize if torch.cuda.is_available() and torch.cuda.is_initialized() else (lambda: None)
    fn()
    best = math.inf
    for _ in range(2):
        sync()
        t0 = time.perf_counter()
        fn()
        sync()
        best = min(best, time.perf_counter() - t0)
    return best


def measure(d_model: int, hidden: int, dtype: torch.dtype, device: torch.device,
            timer: Timer = time_call) -> dict[int, dict[str, float]]:
    """Seconds of each candidate kernel at each bucket: rows `[TIMED_EXPERTS * rows, d_model]`
    times weights `[TIMED_EXPERTS, hidden, d_model]` (the experts' up projection), uneven counts
    (a quarter more for one expert, a quarter less for the other)."""
    gen = torch.Generator().manual_seed(0)
    w = (torch.randn(TIMED_EXPERTS, hidden, d_model, generator=gen) / math.sqrt(d_model)).to(device, dtype)
    out = {}
    for rows in BUCKETS:
        splits = [rows + rows // 4, rows - rows // 4]
        x = torch.randn(sum(splits), d_model, generator=gen).to(device, dtype)
        ends = torch.tensor(splits, device=device).cumsum(0, dtype=torch.int32)
        candidates = {"loop": lambda: loop(x, w, splits)}
        if grouped_mm_applies(x, hidden):
            candidates["grouped"] = lambda: grouped(x, w, ends)
        out[rows] = {kernel: timer(kernel, rows, fn) for kernel, fn in candidates.items()}
    return out


def choose(seconds: dict[int, dict[str, float]]) -> KernelPlan:
    """The faster kernel at each bucket (a tie: the first in `KERNELS`)."""
    return KernelPlan(tuple((rows, min(sorted(times, key=KERNELS.index), key=times.get))
                            for rows, times in sorted(seconds.items())))


def machine_name(device: torch.device) -> str:
    """The CUDA device's name, or the CPU's model string."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.exists():
        for line in cpuinfo.read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def cache_path() -> Path:
    return Path(os.environ.get("EXPERTMESH_CACHE") or Path.home() / ".cache" / "expertmesh") / CACHE_FILE


def cache_key(d_model: int, hidden: int, dtype: torch.dtype, device: torch.device) -> str:
    return f"{machine_name(device)} | torch {torch.__version__} | {str(dtype).removeprefix('torch.')} | " \
           f"d_model {d_model} | hidden {hidden}"


def _read_cache(path: Path) -> dict:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):  # none yet, or unreadable: time again and rewrite it
        return {}
    return data if isinstance(data, dict) else {}


def resolve(setting: str, d_model: int, hidden: int, dtype: torch.dtype, device: torch.device,
            timer: Timer = time_call) -> KernelPlan:
    """The plan for `setting` (one of `SETTINGS`): a fixed kernel, or (`auto`) the cached choice
    for this machine, torch, dtype and shape, timed and cached when absent. A device that cannot
    be timed (the tests' pretend device) gets `DEFAULT`."""
    if setting != "auto":
        return fixed(setting)
    if device.type not in ("cpu", "cuda"):
        return DEFAULT
    path, key = cache_path(), cache_key(d_model, hidden, dtype, device)
    cached = _read_cache(path)
    if key in cached:
        try:
            return KernelPlan.from_json(cached[key]["plan"])
        except (KeyError, TypeError, ValueError):
            pass
    seconds = measure(d_model, hidden, dtype, device, timer)
    plan = choose(seconds)
    cached[key] = {"plan": plan.to_json(), "seconds": {str(r): t for r, t in seconds.items()}}
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(json.dumps(cached, indent=1, sort_keys=True))
        tmp.replace(path)  # atomic: a concurrent start reads the old file or this one
    except OSError:  # a read-only home: this start's choice still holds
        pass
    return plan
