"""Hardware profiles: the only place hardware figures live.

A `HardwareProfile` is one device type and the links around it. Peaks come from the vendor
datasheets named beside them; what a real kernel reaches (efficiencies, collective curves, the
DeepEP-style all-to-all) comes from the published measurements in
`shared/calibration/published-h100.md`, cited row by row beside the constant; what neither gives
(kernel launch cost, GEMM row-count efficiency, cross-node latency) is marked as an assumption.
`benchmarks/sim_vs_published.py` checks the predictions against those measurements.
Bandwidths are per GPU and per direction, in bytes/s; FLOP/s are dense (no sparsity).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, replace
from pathlib import Path

GB = 1e9
TB = 1e12


@dataclass(frozen=True)
class HardwareProfile:
    """One device type. `launch_overlaps`: a GPU queues kernels while earlier ones run, so the
    host's launches and the device's work are two timelines; a CPU issues and runs them in turn,
    launch + work. `compute_slots`: devices that compute at once per node (None: every rank has
    its own device; a CPU host shares its cores between the ranks on it).

    `nvlink_all_reduce`: NCCL-like algorithms inside a node, each
    `(name, latency_s, latency_per_gpu_s, bus_bw, bus_bw_per_gpu)`: at p GPUs an all-reduce of B
    bytes takes latency_s + latency_per_gpu_s (p - 1) + 2 (p-1)/p B / (bus_bw + bus_bw_per_gpu p)
    and the fastest algorithm is chosen per size, as NCCL's tuner does. Empty: a plain ring with
    `nvlink_latency_s` per step (what a calibrated CPU profile measures for gloo).
    `low_latency_a2a`: `(latency_s at EP 8, latency_s per doubling of EP, bandwidth)` of a
    DeepEP-style low-latency all-to-all over RDMA (None: not available).
    `nics_per_node`: network ports of a node, each of `net_bw` (None: one per GPU, as DGX H100);
    GPUs of a node that use the network at once share them.
    `step_host_s`: host time of one engine step outside the forward (scheduling, Python, the
    control messages' serialisation; their latency is costed per message): fitted for a CPU
    profile (benchmarks/sim_vs_real.py), 0 for the GPU catalogue, where it is unmeasured.
    `h2d_bw`: host-to-device copy bandwidth, one direction, bytes/s (weights read from storage
    reach the GPU through it; None: the device is the host's memory, nothing is copied)."""

    name: str
    bf16_flops: float            # dense BF16 matmul peak, FLOP/s
    fp32_flops: float | None     # dense FP32 matmul peak, FLOP/s (None: not published)
    hbm_bytes: float             # device memory, bytes
    hbm_bw: float                # device memory bandwidth, bytes/s
    nvlink_bw: float             # intra-node bandwidth per GPU, one direction, bytes/s
    net_bw: float                # inter-node bandwidth per GPU, one direction, bytes/s
    nvlink_latency_s: float      # per message inside a node
    net_latency_s: float         # per message across nodes
    gpus_per_node: int
    launch_s: float              # fixed cost of one kernel / framework op
    gemm_peak_efficiency: float  # fraction of peak a large GEMM reaches
    gemm_half_tokens: float      # tokens (GEMM rows) at which a GEMM reaches half that fraction
    hbm_efficiency: float        # fraction of hbm_bw a streaming read reaches
    launch_overlaps: bool = True  # launches queue while earlier work runs (a GPU stream)
    compute_slots: float | None = None
    source: str = "catalogue"
    fp8_flops: float | None = None    # dense FP8 matmul peak, FLOP/s (None: no FP8 tensor cores)
    fp8_gemm_efficiency: float = 1.0  # fraction of fp8_flops a large FP8 GEMM reaches
    nvlink_efficiency: float = 1.0    # fraction of nvlink_bw a large point-to-point copy reaches
    net_efficiency: float = 1.0       # fraction of net_bw a large transfer reaches
    nvlink_all_reduce: tuple = ()
    low_latency_a2a: tuple | None = None
    nics_per_node: int | None = None
    step_host_s: float = 0.0
    h2d_bw: float | None = None

    def __post_init__(self) -> None:
        for name in ("bf16_flops", "hbm_bytes", "hbm_bw", "nvlink_bw", "net_bw", "gemm_half_tokens"):
            if not getattr(self, name) > 0:
                raise ValueError(f"HardwareProfile.{name}={getattr(self, name)!r} must be > 0")
        for name in ("nvlink_latency_s", "net_latency_s", "launch_s", "step_host_s"):
            if getattr(self, name) < 0:
                raise ValueError(f"HardwareProfile.{name}={getattr(self, name)!r} must be >= 0")
        for name in ("gemm_peak_efficiency", "hbm_efficiency", "fp8_gemm_efficiency",
                     "nvlink_efficiency", "net_efficiency"):
            if not 0 < getattr(self, name) <= 1:
                raise ValueError(f"HardwareProfile.{name}={getattr(self, name)!r} must be in (0, 1]")
        if self.h2d_bw is not None and not self.h2d_bw > 0:
            raise ValueError(f"HardwareProfile.h2d_bw={self.h2d_bw!r} must be > 0 or None")
        if self.gpus_per_node < 1:
            raise ValueError(f"HardwareProfile.gpus_per_node={self.gpus_per_node} must be >= 1")
        if self.nics_per_node is not None and self.nics_per_node < 1:
            raise ValueError(f"HardwareProfile.nics_per_node={self.nics_per_node} must be >= 1 or None")
        if self.compute_slots is not None and self.compute_slots < 1:
            raise ValueError(f"HardwareProfile.compute_slots={self.compute_slots} must be >= 1 or None")

    def matmul_flops(self, dtype: str) -> float:
        """Peak matmul FLOP/s for a compute dtype (`"bf16"`, `"fp32"` or `"fp8"`)."""
        peak = {"bf16": self.bf16_flops, "fp32": self.fp32_flops, "fp8": self.fp8_flops}.get(dtype)
        if peak is None:
            raise ValueError(f"profile {self.name} has no {dtype} matmul figure; "
                             f"simulate the model in bf16 or calibrate a profile")
        return peak

    def matmul_efficiency(self, dtype: str) -> float:
        """Fraction of `matmul_flops(dtype)` a large GEMM reaches."""
        return self.fp8_gemm_efficiency if dtype == "fp8" else self.gemm_peak_efficiency

    def with_(self, **changes) -> "HardwareProfile":
        return replace(self, **changes)

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(asdict(self), indent=2) + "\n")

    @classmethod
    def load(cls, path: str | Path) -> "HardwareProfile":
        try:
            data = json.loads(Path(path).read_text())
        except json.JSONDecodeError as exc:
            raise ValueError(f"profile {path} is not valid JSON ({exc}); write it with "
                             f"`expertmesh calibrate`") from None
        if not isinstance(data, dict):
            raise ValueError(f"profile {path} must be a JSON object of profile fields; write it "
                             f"with `expertmesh calibrate`")
        unknown = set(data) - set(cls.__dataclass_fields__)
        if unknown:
            raise ValueError(f"profile {path} has unknown fields {sorted(unknown)}; "
                             f"write it with `expertmesh calibrate`")
        for key in ("nvlink_all_reduce", "low_latency_a2a"):  # JSON has lists, the profile tuples
            if isinstance(data.get(key), list):
                data[key] = tuple(tuple(v) if isinstance(v, list) else v for v in data[key])
        try:
            return cls(**data)
        except TypeError as exc:  # a missing field, or a value of the wrong type
            raise ValueError(f"profile {path}: {exc}; write it with `expertmesh calibrate`") from None


# Measured on H100 / H200 (published-h100.md, "Memory and compute" and "Collectives" rows):
# - bf16 GEMM, best shape: 794.5 TFLOP/s = 80% of the 989 dense peak (stas00/ml-engineering).
# - FP8 GEMM, cuBLASLt m = n = k = 16384: 1377 TFLOP/s = 70% of the 1979 dense peak (Azure guide).
# - NVLink P2P: 376 GB/s of 450 unidirectional = 83.5% (stas00/ml-engineering, p2pBandwidthLatencyTest).
# - InfiniBand NDR: 46-49 GB/s of 50 per ConnectX-7 NIC, 48 = 96% (nccl-tests issues 290, 267).
# - all_reduce, 8 x H100 NVLink, NCCL 2.18.5 (Azure ND v5): the bus-bandwidth curve fits three
#   regimes, each latency + bytes / bus bandwidth, by least squares on its rows (time = size /
#   (busbw x 8/14)): LL (1 KB, 64 KB) 25.3 us and 6.8 GB/s; tree (1 MB, 16 MB) 36.4 us and
#   330 GB/s; large (128 MB .. 8 GB) 109 us and 480 GB/s. Large messages: ring 365-370 GB/s at 2-8
#   GPUs, NVLS 420 / 440 / 460 / 480 at 5 / 6 / 7 / 8 GPUs (320 + 20 p; extrapolated below 5),
#   NVIDIA/nccl issue 1455. LL latency per GPU: through 6 us at 2 GPUs (NVLSTree, NCCL issue 1259)
#   and 25.3 us at 8: 2.8 us + 3.2 us x (p - 1). Tree latency is taken as flat in p (one point).
# - DeepEP low-latency dispatch / combine, EP 8-64 over RDMA (README-NCCL.md): 128 tokens x top-8
#   x 7168 (FP8 + scales out, BF16 back) fit latency + bytes / bandwidth with 19.9 us at EP 8,
#   +16.5 us per doubling, 52.4 GB/s (every row within 5%).
_H100_ALL_REDUCE = (("LL", 2.8e-6, 3.2e-6, 6.8 * GB, 0.0), ("tree", 36.4e-6, 0.0, 330 * GB, 0.0),
                    ("ring", 109e-6, 0.0, 367 * GB, 0.0), ("NVLS", 109e-6, 0.0, 320 * GB, 20 * GB))
_MEASURED = dict(gemm_peak_efficiency=794.5 / 989, fp8_gemm_efficiency=1377 / 1979,
                 nvlink_efficiency=376 / 450, net_efficiency=48 / 50,
                 nvlink_all_reduce=_H100_ALL_REDUCE, low_latency_a2a=(19.9e-6, 16.5e-6, 52.4 * GB))
# Assumptions no published row gives:
# - a GEMM reaches half its large-shape efficiency near 64 rows (a 64-row tile wastes most of a
#   128-row tile's work below it);
# - one point-to-point message costs ~3 us inside a node, ~10 us across InfiniBand;
# - one kernel launch costs ~4 us of host time when kernels are not captured in CUDA graphs.
_ASSUMED = dict(gemm_half_tokens=64.0, nvlink_latency_s=3e-6, net_latency_s=10e-6, launch_s=4e-6)
# A100 and B200 have no published rows here: their efficiencies and latencies are the H100's
# and their all-reduce bandwidths the H100's scaled by NVLink bandwidth, assumed.


def _scaled(table: tuple, factor: float) -> tuple:
    return tuple((name, lat, lat_gpu, bw * factor, bw_gpu * factor) for name, lat, lat_gpu, bw, bw_gpu in table)


_GPU_ASSUMPTIONS = dict(**_ASSUMED, **_MEASURED)

CATALOGUE: dict[str, HardwareProfile] = {
    # NVIDIA H100 Tensor Core GPU datasheet (SXM5): BF16 1,979 TFLOPS with sparsity (989 dense),
    # FP32 67 TFLOPS, 80 GB HBM3 at 3.35 TB/s, NVLink 900 GB/s (both directions).
    # NVIDIA DGX H100 datasheet: 8 GPUs per node, one ConnectX-7 400 Gb/s NDR InfiniBand per GPU.
    # FP8 3,958 TFLOPS sparse (1,979 dense). HBM triad 2.97 TB/s = 89% of 3.35 (Azure guide).
    # PCIe Gen5 128 GB/s (both directions): 64 GB/s host to device, assumed reached.
    "h100": HardwareProfile(
        name="H100 SXM", bf16_flops=989e12, fp32_flops=67e12, hbm_bytes=80 * GB, hbm_bw=3.35 * TB,
        nvlink_bw=450 * GB, net_bw=50 * GB, gpus_per_node=8, fp8_flops=1979e12, h2d_bw=64 * GB,
        hbm_efficiency=2.97 / 3.35, **_GPU_ASSUMPTIONS),
    # NVIDIA H200 Tensor Core GPU datasheet (SXM): BF16 1,979 TFLOPS sparse (989 dense), FP32
    # 67 TFLOPS, 141 GB HBM3e at 4.8 TB/s, NVLink 900 GB/s. NVIDIA DGX H200 datasheet: 8 GPUs,
    # ConnectX-7 400 Gb/s NDR per GPU.
    # FP8 1,979 dense. HBM triad 4.15 TB/s = 86% of 4.8 (Azure guide). PCIe Gen5 128 GB/s (both
    # directions): 64 GB/s host to device, assumed reached.
    "h200": HardwareProfile(
        name="H200 SXM", bf16_flops=989e12, fp32_flops=67e12, hbm_bytes=141 * GB, hbm_bw=4.8 * TB,
        nvlink_bw=450 * GB, net_bw=50 * GB, gpus_per_node=8, fp8_flops=1979e12, h2d_bw=64 * GB,
        hbm_efficiency=4.15 / 4.8, **_GPU_ASSUMPTIONS),
    # NVIDIA A100 Tensor Core GPU datasheet (80GB SXM): BF16 312 TFLOPS dense, FP32 19.5 TFLOPS,
    # 80 GB HBM2e at 2,039 GB/s, NVLink 600 GB/s. NVIDIA DGX A100 datasheet: 8 GPUs, ConnectX-6
    # 200 Gb/s HDR InfiniBand per GPU. PCIe Gen4 64 GB/s (both directions): 32 GB/s host to
    # device, assumed reached.
    "a100": HardwareProfile(
        name="A100 80GB SXM", bf16_flops=312e12, fp32_flops=19.5e12, hbm_bytes=80 * GB,
        hbm_bw=2.039 * TB, nvlink_bw=300 * GB, net_bw=25 * GB, gpus_per_node=8, hbm_efficiency=0.89,
        h2d_bw=32 * GB,
        # no NVLink SHARP (NVLS) on A100's NVSwitch: the H100 curves without it, bandwidths scaled
        **{**_GPU_ASSUMPTIONS, "nvlink_all_reduce": _scaled(_H100_ALL_REDUCE[:3], 300 / 450)}),
    # NVIDIA DGX B200 datasheet: 8 B200 GPUs, 1,440 GB HBM3e in total (180 GB each) at 64 TB/s in
    # total (8 TB/s each), 72 PFLOPS FP8 training (9 sparse, so 2.25 dense BF16 per GPU), NVLink 5
    # 1.8 TB/s per GPU (both directions), ConnectX-7 400 Gb/s per GPU. FP32 is not on it. Host
    # to device: PCIe Gen5 x16's 64 GB/s, assumed (not on the datasheet).
    "b200": HardwareProfile(
        name="B200", bf16_flops=2.25e15, fp32_flops=None, hbm_bytes=180 * GB, hbm_bw=8 * TB,
        nvlink_bw=900 * GB, net_bw=50 * GB, gpus_per_node=8, fp8_flops=4.5e15, hbm_efficiency=0.89,
        h2d_bw=64 * GB,
        **{**_GPU_ASSUMPTIONS, "nvlink_all_reduce": _scaled(_H100_ALL_REDUCE, 900 / 450)}),
}


def get_profile(name_or_path: str) -> HardwareProfile:
    """A catalogue entry (`h100`, `h200`, `a100`, `b200`) or a JSON profile written by calibrate."""
    key = name_or_path.lower()
    if key in CATALOGUE:
        return CATALOGUE[key]
    if Path(name_or_path).is_file():
        return HardwareProfile.load(name_or_path)
    raise ValueError(f"unknown hardware {name_or_path!r}; use one of {', '.join(CATALOGUE)} "
                     f"or the path of a profile written by `expertmesh calibrate`")
