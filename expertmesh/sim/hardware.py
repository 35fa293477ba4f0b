"""Hardware profiles: the only place hardware figures live.

A `HardwareProfile` is one device type and the links around it. Catalogue figures come from the
vendor datasheets named beside them; figures no datasheet gives (efficiencies, latencies, launch
overhead) are marked as assumptions and are what `calibrate` replaces with measurements.
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
    """One device type. `launch_overlaps`: a GPU queues kernels while earlier ones run, so an op
    takes max(launch, work); a CPU issues and runs them in turn, launch + work. `compute_slots`:
    devices that compute at once per node (None: every rank has its own device; a CPU host
    shares its cores between the ranks on it)."""

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
    compute_slots: int | None = None
    source: str = "catalogue"

    def __post_init__(self) -> None:
        for name in ("bf16_flops", "hbm_bytes", "hbm_bw", "nvlink_bw", "net_bw", "gemm_half_tokens"):
            if not getattr(self, name) > 0:
                raise ValueError(f"HardwareProfile.{name}={getattr(self, name)!r} must be > 0")
        for name in ("nvlink_latency_s", "net_latency_s", "launch_s"):
            if getattr(self, name) < 0:
                raise ValueError(f"HardwareProfile.{name}={getattr(self, name)!r} must be >= 0")
        for name in ("gemm_peak_efficiency", "hbm_efficiency"):
            if not 0 < getattr(self, name) <= 1:
                raise ValueError(f"HardwareProfile.{name}={getattr(self, name)!r} must be in (0, 1]")
        if self.gpus_per_node < 1:
            raise ValueError(f"HardwareProfile.gpus_per_node={self.gpus_per_node} must be >= 1")
        if self.compute_slots is not None and self.compute_slots < 1:
            raise ValueError(f"HardwareProfile.compute_slots={self.compute_slots} must be >= 1 or None")

    def matmul_flops(self, dtype: str) -> float:
        """Peak matmul FLOP/s for a model dtype (`"bf16"` or `"fp32"`)."""
        peak = self.bf16_flops if dtype == "bf16" else self.fp32_flops if dtype == "fp32" else None
        if peak is None:
            raise ValueError(f"profile {self.name} has no {dtype} matmul figure; "
                             f"simulate the model in bf16 or calibrate a profile")
        return peak

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
        try:
            return cls(**data)
        except TypeError as exc:  # a missing field, or a value of the wrong type
            raise ValueError(f"profile {path}: {exc}; write it with `expertmesh calibrate`") from None


# Assumptions shared by the GPU entries (no datasheet gives them):
# - cuBLAS BF16 GEMMs reach about 80% of dense peak when large, and half of that near 64 rows
#   (one 64-row tile wastes most of a 128-row tile's work below it).
# - HBM streaming reads reach about 90% of the datasheet bandwidth.
# - NCCL small-message latency: a few microseconds over NVLink, ~10 us across InfiniBand.
# - One kernel launch costs ~4 us when kernels are not captured in CUDA graphs.
_GPU_ASSUMPTIONS = dict(gemm_peak_efficiency=0.8, gemm_half_tokens=64.0, hbm_efficiency=0.9,
                        nvlink_latency_s=3e-6, net_latency_s=10e-6, launch_s=4e-6)

CATALOGUE: dict[str, HardwareProfile] = {
    # NVIDIA H100 Tensor Core GPU datasheet (SXM5): BF16 1,979 TFLOPS with sparsity (989 dense),
    # FP32 67 TFLOPS, 80 GB HBM3 at 3.35 TB/s, NVLink 900 GB/s (both directions).
    # NVIDIA DGX H100 datasheet: 8 GPUs per node, one ConnectX-7 400 Gb/s NDR InfiniBand per GPU.
    "h100": HardwareProfile(
        name="H100 SXM", bf16_flops=989e12, fp32_flops=67e12, hbm_bytes=80 * GB, hbm_bw=3.35 * TB,
        nvlink_bw=450 * GB, net_bw=50 * GB, gpus_per_node=8, **_GPU_ASSUMPTIONS),
    # NVIDIA H200 Tensor Core GPU datasheet (SXM): BF16 1,979 TFLOPS sparse (989 dense), FP32
    # 67 TFLOPS, 141 GB HBM3e at 4.8 TB/s, NVLink 900 GB/s. NVIDIA DGX H200 datasheet: 8 GPUs,
    # ConnectX-7 400 Gb/s NDR per GPU.
    "h200": HardwareProfile(
        name="H200 SXM", bf16_flops=989e12, fp32_flops=67e12, hbm_bytes=141 * GB, hbm_bw=4.8 * TB,
        nvlink_bw=450 * GB, net_bw=50 * GB, gpus_per_node=8, **_GPU_ASSUMPTIONS),
    # NVIDIA A100 Tensor Core GPU datasheet (80GB SXM): BF16 312 TFLOPS dense, FP32 19.5 TFLOPS,
    # 80 GB HBM2e at 2,039 GB/s, NVLink 600 GB/s. NVIDIA DGX A100 datasheet: 8 GPUs, ConnectX-6
    # 200 Gb/s HDR InfiniBand per GPU.
    "a100": HardwareProfile(
        name="A100 80GB SXM", bf16_flops=312e12, fp32_flops=19.5e12, hbm_bytes=80 * GB,
        hbm_bw=2.039 * TB, nvlink_bw=300 * GB, net_bw=25 * GB, gpus_per_node=8, **_GPU_ASSUMPTIONS),
    # NVIDIA DGX B200 datasheet: 8 B200 GPUs, 1,440 GB HBM3e in total (180 GB each) at 64 TB/s in
    # total (8 TB/s each), 72 PFLOPS FP8 training (9 sparse, so 2.25 dense BF16 per GPU), NVLink 5
    # 1.8 TB/s per GPU (both directions), ConnectX-7 400 Gb/s per GPU. FP32 is not on it.
    "b200": HardwareProfile(
        name="B200", bf16_flops=2.25e15, fp32_flops=None, hbm_bytes=180 * GB, hbm_bw=8 * TB,
        nvlink_bw=900 * GB, net_bw=50 * GB, gpus_per_node=8, **_GPU_ASSUMPTIONS),
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
