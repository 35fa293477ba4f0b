"""Cost of one operation on one rank: device time, host time, and the volume it moves.

Notation: m GEMM rows (tokens), n output features, k input features, b sequences, L new positions,
S cached positions, h query heads and g KV heads on this rank, d head_dim, p ranks in a group.
All sizes are element counts, `itemsize` bytes per element; times are seconds.

Models:
- GEMM: roofline, max(FLOPs / (peak x efficiency(m)), bytes / HBM bandwidth);
  efficiency(m) = large-GEMM efficiency x m / (m + half_tokens) (small GEMMs waste most of a
  tile). Compute dtype `fp8` reads 1-byte weights at the FP8 peak and efficiency.
- attention: 4 h d FLOPs per (query, key) pair, causal; reads the cached K and V once.
- elementwise ops (norms, rotary, combine): memory bound.
- launches: each op costs `launch_s` of host time. On a GPU that is a separate timeline the
  simulator plays against the device's (simulator.py); on a CPU the host is the device, so the
  launch adds to the op's own time.
- collectives: all-reduce picks the fastest of the profile's NCCL-like algorithms for the size
  (latency + bus bytes / bus bandwidth, fitted to published curves); all-to-all pays one
  collective latency plus the larger of what a rank sends and receives over each link class
  (NVLink inside a node, the network across nodes), or, as `low-latency`, the DeepEP-style
  RDMA kernel's latency and bandwidth. Profiles without algorithm curves (calibrated CPUs, gloo)
  pay a latency per message in sequence, as gloo does.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache

from expertmesh.sim.hardware import HardwareProfile
from expertmesh.topology import Topology

RESOURCES = ("compute", "hbm", "nvlink", "network", "launch")


@dataclass(frozen=True)
class Cost:
    """One op: `seconds` of device time, `host_s` of host (launch) time, and what it moved.
    `resource` is the one that set its device time."""

    seconds: float
    resource: str
    flops: float = 0.0
    hbm_bytes: float = 0.0
    nvlink_bytes: float = 0.0
    network_bytes: float = 0.0
    host_s: float = 0.0

    def __add__(self, other: "Cost") -> "Cost":
        slow = self if self.seconds >= other.seconds else other
        return Cost(self.seconds + other.seconds, slow.resource, self.flops + other.flops,
                    self.hbm_bytes + other.hbm_bytes, self.nvlink_bytes + other.nvlink_bytes,
                    self.network_bytes + other.network_bytes, self.host_s + other.host_s)


ZERO = Cost(0.0, "launch")


def launched(hw: HardwareProfile, launches: int) -> Cost:
    """An op with no work: its launches only."""
    return _op(hw, 0.0, 0.0, launches, 0.0, 0.0)


def total(costs) -> Cost:
    out = ZERO
    for c in costs:
        out = out + c
    return out


def gemm_efficiency(hw: HardwareProfile, m: float, dtype: str = "bf16") -> float:
    return hw.matmul_efficiency(dtype) * m / (m + hw.gemm_half_tokens)


def weight_itemsize(dtype: str, itemsize: int) -> int:
    """Bytes per weight element: FP8 GEMMs read 1-byte weights, the others the activations' size."""
    return 1 if dtype == "fp8" else itemsize


def _op(hw: HardwareProfile, t_compute: float, t_memory: float, launches: int, flops: float,
        nbytes: float) -> Cost:
    """The roofline of some work, with the host time of its `launches` ops beside it (GPU) or
    added to it (CPU, where the host runs the op)."""
    work = max(t_compute, t_memory)
    t_launch = launches * hw.launch_s
    if hw.launch_overlaps:
        resource = "compute" if t_compute >= t_memory and flops else "hbm"
        return Cost(work, resource, flops=flops, hbm_bytes=nbytes, host_s=t_launch)
    resource = "launch" if t_launch > work else "compute" if t_compute >= t_memory else "hbm"
    return Cost(t_launch + work, resource, flops=flops, hbm_bytes=nbytes)


def _roofline(hw: HardwareProfile, dtype: str, flops: float, nbytes: float, rows: float) -> Cost:
    rate = hw.matmul_flops(dtype) * gemm_efficiency(hw, rows, dtype)
    t_compute = flops / rate if flops else 0.0
    return _op(hw, t_compute, nbytes / (hw.hbm_bw * hw.hbm_efficiency), 1, flops, nbytes)


@lru_cache(maxsize=None)
def gemm(hw: HardwareProfile, dtype: str, itemsize: int, m: float, n: int, k: int) -> Cost:
    """x `[m, k]` @ w.T `[k, n]` -> `[m, n]`; reads x and w, writes the output (m 0: no work)."""
    if m == 0:
        return launched(hw, 1)
    nbytes = (m * k + m * n) * itemsize + k * n * weight_itemsize(dtype, itemsize)
    return _roofline(hw, dtype, 2.0 * m * n * k, nbytes, max(m, 1.0))


@lru_cache(maxsize=None)
def grouped_gemm(hw: HardwareProfile, dtype: str, itemsize: int, rows: tuple[float, ...],
                 n: int, k: int, used: tuple[float, ...] | None = None) -> Cost:
    """One grouped matmul over experts: expert e multiplies `[rows[e], k]` by its `[k, n]` weight.

    Only experts that receive rows read their weight: `used[e]` is the chance that expert e
    gets any (expected rows are fractions; default: 1 wherever rows[e] > 0). The FLOPs of each
    expert run at the efficiency of its own row count.
    """
    active = [m for m in rows if m > 0]
    if not active:
        return launched(hw, 1)
    readers = sum(used) if used is not None else len(active)
    peak = hw.matmul_flops(dtype)
    t_compute = sum(2.0 * m * n * k / (peak * gemm_efficiency(hw, max(m, 1.0), dtype)) for m in active)
    flops = sum(2.0 * m * n * k for m in active)
    nbytes = readers * k * n * weight_itemsize(dtype, itemsize) + sum(active) * (k + n) * itemsize
    return _op(hw, t_compute, nbytes / (hw.hbm_bw * hw.hbm_efficiency), 1, flops, nbytes)


@lru_cache(maxsize=None)
def attention(hw: HardwareProfile, dtype: str, itemsize: int, b: int, L: int, start: float,
              h: int, g: int, d: int, kv_itemsize: int | None = None) -> Cost:
    """Causal attention of L new positions over start + L cached ones, for b sequences.

    Prefill (start 0): FLOPs grow with L^2. Decode (L 1): the read of S = start + 1 cached K and V,
    `2 b S g d` elements of `kv_itemsize` bytes (default: `itemsize`), dominates.
    """
    pairs = b * (L * start + L * (L + 1) / 2)
    flops = 4.0 * h * d * pairs
    kv = 2.0 * b * (start + L) * g * d * (kv_itemsize or itemsize)
    qo = 2.0 * b * L * h * d * itemsize
    return _roofline(hw, dtype, flops, kv + qo, max(L * h / g, 1.0))


@lru_cache(maxsize=None)
def elementwise(hw: HardwareProfile, nbytes: float, launches: int) -> Cost:
    """`launches` memory-bound ops that together read and write `nbytes`."""
    return _op(hw, 0.0, nbytes / (hw.hbm_bw * hw.hbm_efficiency), launches, 0.0, nbytes)


@dataclass(frozen=True)
class Link:
    """A link class: per-message latency and the one-direction bandwidth a transfer reaches."""

    name: str  # "nvlink" or "network"
    latency_s: float
    bw: float


def nvlink(hw: HardwareProfile) -> Link:
    return Link("nvlink", hw.nvlink_latency_s, hw.nvlink_bw * hw.nvlink_efficiency)


def network(hw: HardwareProfile) -> Link:
    return Link("network", hw.net_latency_s, hw.net_bw * hw.net_efficiency)


def link_for(hw: HardwareProfile, topology: Topology, ranks) -> Link:
    """The slowest link a group of ranks crosses: the network as soon as it spans two nodes."""
    return network(hw) if topology.spans_nodes(ranks) else nvlink(hw)


def _on(link: Link, seconds: float, nbytes: float) -> Cost:
    moved = {f"{link.name}_bytes": nbytes}
    return Cost(seconds, link.name, **moved)


def send_recv(link: Link, nbytes: float) -> Cost:
    """One point-to-point message."""
    return _on(link, link.latency_s + nbytes / link.bw, nbytes)


def all_reduce_algorithm(hw: HardwareProfile, nbytes: float, p: int) -> tuple[str, float]:
    """(name, seconds) of the fastest of the profile's NVLink all-reduce algorithms for an
    `nbytes` buffer over p GPUs of one node."""
    bus = 2.0 * (p - 1) / p * nbytes
    return min(((name, lat + lat_gpu * (p - 1) + bus / (bw + bw_gpu * p))
                for name, lat, lat_gpu, bw, bw_gpu in hw.nvlink_all_reduce), key=lambda a: a[1])


def collective_latency(hw: HardwareProfile, p: int) -> float:
    """Latency of the smallest collective over p GPUs of one node: the LL algorithm's."""
    return min(lat + lat_gpu * (p - 1) for _, lat, lat_gpu, _, _ in hw.nvlink_all_reduce)


def all_reduce(hw: HardwareProfile, topology: Topology, ranks, nbytes: float) -> Cost:
    """All-reduce of an `nbytes` buffer over `ranks`: 2 (p-1)/p of it crosses each rank's link.

    Inside a node with published curves: the fastest algorithm for the size. Across nodes, or
    without curves: a ring, 2 (p-1) steps of the link's latency plus the bytes at its bandwidth.
    """
    p = len(ranks)
    if p == 1:
        return ZERO
    link = link_for(hw, topology, ranks)
    sent = 2.0 * (p - 1) / p * nbytes
    if link.name == "nvlink" and hw.nvlink_all_reduce:
        return _on(link, all_reduce_algorithm(hw, nbytes, p)[1], sent)
    return _on(link, 2 * (p - 1) * link.latency_s + sent / link.bw, sent)


def all_gather(hw: HardwareProfile, topology: Topology, ranks, nbytes: float) -> Cost:
    """All-gather (or reduce-scatter) of an `nbytes` buffer over `ranks`: half an all-reduce,
    which a ring runs as a reduce-scatter then an all-gather ((p-1)/p of the buffer each)."""
    c = all_reduce(hw, topology, ranks, nbytes)
    return Cost(c.seconds / 2, c.resource, nvlink_bytes=c.nvlink_bytes / 2,
                network_bytes=c.network_bytes / 2)


def host_time(hw: HardwareProfile, seconds: float) -> Cost:
    """Work of the host alone: its own timeline on a GPU, the rank's time on a CPU."""
    if hw.launch_overlaps:
        return Cost(0.0, "launch", host_s=seconds)
    return Cost(seconds, "launch")


def host_messages(hw: HardwareProfile, topology: Topology, ranks, messages: int) -> Cost:
    """`messages` small messages in sequence between the host processes of `ranks` (gloo), at
    the per-message latency of the link they cross."""
    if len(ranks) < 2:
        return ZERO
    return host_time(hw, messages * link_for(hw, topology, ranks).latency_s)


def _per_class(topology: Topology, ranks: list[int], send: list[list[float]], i: int) -> dict:
    """What rank i sends and receives, and to how many peers, over each link class."""
    out = {"nvlink": [0.0, 0.0, 0], "network": [0.0, 0.0, 0]}
    for j in range(len(ranks)):
        if i == j:
            continue
        cls = "network" if topology.node_of(ranks[i]) != topology.node_of(ranks[j]) else "nvlink"
        out[cls][0] += send[i][j]
        out[cls][1] += send[j][i]
        out[cls][2] += 1
    return out


def all_to_all(hw: HardwareProfile, topology: Topology, ranks: list[int],
               send: list[list[float]]) -> list[Cost]:
    """All-to-all with uneven splits: `send[i][j]` bytes from ranks[i] to ranks[j] -> cost per rank.

    A rank's NVLink and network traffic flow at once; each class takes the larger of what the
    rank sends and receives over it. Latency: with published curves, one collective latency at
    the group's size (the sends to all peers are issued together), plus the network's message
    latency once if the group spans nodes; without (gloo), one latency per peer in sequence.
    The collective ends for all when the slowest rank is done (the caller takes the max).
    """
    p = len(ranks)
    out = []
    for i in range(p):
        per_class = _per_class(topology, ranks, send, i)
        parts = []
        for link in (nvlink(hw), network(hw)):
            sent, received, peers = per_class[link.name]
            if not peers:
                continue
            if hw.nvlink_all_reduce:
                latency = collective_latency(hw, min(p, topology.gpus_per_node))
                latency += link.latency_s if link.name == "network" else 0.0
            else:
                latency = peers * link.latency_s
            parts.append(_on(link, latency + max(sent, received) / link.bw, sent))
        slowest = max(parts, key=lambda c: c.seconds) if parts else ZERO
        out.append(Cost(slowest.seconds, slowest.resource,
                        nvlink_bytes=sum(c.nvlink_bytes for c in parts),
                        network_bytes=sum(c.network_bytes for c in parts)))
    return out


def low_latency_all_to_all(hw: HardwareProfile, topology: Topology, ranks: list[int],
                           send: list[list[float]]) -> list[Cost]:
    """DeepEP-style low-latency all-to-all: every byte goes through the kernel's RDMA buffers
    (NVLink peers and the rank's own experts too), at the published kernel's latency for the
    group size (EP 8's below 8) and its bandwidth."""
    if hw.low_latency_a2a is None:
        raise ValueError(f"profile {hw.name} has no low-latency all-to-all figures; "
                         f"use --a2a-kernel nccl")
    lat8, per_doubling, bw = hw.low_latency_a2a
    p = len(ranks)
    latency = lat8 + per_doubling * max(0.0, math.log2(p / 8))
    out = []
    for i in range(p):
        sent = sum(send[i][j] for j in range(p))
        received = sum(send[j][i] for j in range(p))
        out.append(Cost(latency + max(sent, received) / bw, "network", network_bytes=sent))
    return out


def hierarchical_all_to_all(hw: HardwareProfile, topology: Topology, ranks: list[int],
                            send: list[list[float]]) -> list[Cost]:
    """Rail-aligned two-phase all-to-all: first each rank sends, to the rank with its local index
    on every other node, everything bound for that node (nodes - 1 messages instead of one per
    remote rank), then each node redistributes over NVLink what arrived.
    """
    nodes = sorted({topology.node_of(r) for r in ranks})
    if len(nodes) == 1:
        return all_to_all(hw, topology, ranks, send)
    p = len(ranks)
    node = [topology.node_of(r) for r in ranks]
    per_node = p // len(nodes)
    net, nv = network(hw), nvlink(hw)
    out = []
    for i in range(p):
        remote_out = sum(send[i][j] for j in range(p) if node[j] != node[i])
        remote_in = sum(send[j][i] for j in range(p) if node[j] != node[i])
        local_out = sum(send[i][j] for j in range(p) if node[j] == node[i] and j != i)
        # what arrived over the rail for the node's other ranks is forwarded once more
        forwarded = remote_in * (per_node - 1) / per_node
        if hw.nvlink_all_reduce:
            net_lat = collective_latency(hw, len(nodes)) + net.latency_s
            nv_lat = collective_latency(hw, per_node)
        else:
            net_lat, nv_lat = (len(nodes) - 1) * net.latency_s, (per_node - 1) * nv.latency_s
        t_net = net_lat + max(remote_out, remote_in) / net.bw
        t_nv = nv_lat + (local_out + forwarded) / nv.bw
        resource = "network" if t_net >= t_nv else "nvlink"
        out.append(Cost(t_net + t_nv, resource, nvlink_bytes=local_out + forwarded,
                        network_bytes=remote_out))
    return out
