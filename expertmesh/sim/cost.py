"""Cost of one operation on one rank: time, and the volume it moves on each resource.

Notation: m GEMM rows (tokens), n output features, k input features, b sequences, L new positions,
S cached positions, h query heads and g KV heads on this rank, d head_dim, p ranks in a group.
All sizes are element counts, `itemsize` bytes per element; times are seconds.

Models:
- GEMM: roofline, max(FLOPs / (peak x efficiency(m)), bytes / HBM bandwidth), and one launch
  (hidden behind the work where launches overlap it, added to it where they do not);
  efficiency(m) = peak_efficiency x m / (m + half_tokens) (small GEMMs waste most of a tile).
- attention: 4 h d FLOPs per (query, key) pair, causal; reads the cached K and V once.
- elementwise ops (norms, rotary, combine): memory bound, plus one launch each.
- collectives: latency per message + bytes / bandwidth of the link class they cross
  (NVLink inside a node, the network across nodes): ring all-reduce sends 2 (p-1)/p of the
  buffer in 2 (p-1) messages; all-to-all sends each peer its split (p-1 messages per rank).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

from expertmesh.sim.hardware import HardwareProfile
from expertmesh.topology import Topology

RESOURCES = ("compute", "hbm", "nvlink", "network", "launch")


@dataclass(frozen=True)
class Cost:
    """One op: `seconds` and what it moved. `resource` is the one that set its time."""

    seconds: float
    resource: str
    flops: float = 0.0
    hbm_bytes: float = 0.0
    nvlink_bytes: float = 0.0
    network_bytes: float = 0.0

    def __add__(self, other: "Cost") -> "Cost":
        slow = self if self.seconds >= other.seconds else other
        return Cost(self.seconds + other.seconds, slow.resource, self.flops + other.flops,
                    self.hbm_bytes + other.hbm_bytes, self.nvlink_bytes + other.nvlink_bytes,
                    self.network_bytes + other.network_bytes)


ZERO = Cost(0.0, "launch")


def total(costs) -> Cost:
    out = ZERO
    for c in costs:
        out = out + c
    return out


def gemm_efficiency(hw: HardwareProfile, m: float) -> float:
    return hw.gemm_peak_efficiency * m / (m + hw.gemm_half_tokens)


def _op(hw: HardwareProfile, t_compute: float, t_memory: float, launches: int, flops: float,
        nbytes: float) -> Cost:
    """Combine the roofline of some work with the launch cost of its `launches` ops."""
    work = max(t_compute, t_memory)
    t_launch = launches * hw.launch_s
    resource = "launch" if t_launch > work else "compute" if t_compute >= t_memory else "hbm"
    seconds = max(t_launch, work) if hw.launch_overlaps else t_launch + work
    return Cost(seconds, resource, flops=flops, hbm_bytes=nbytes)


def _roofline(hw: HardwareProfile, dtype: str, flops: float, nbytes: float, rows: float) -> Cost:
    t_compute = flops / (hw.matmul_flops(dtype) * gemm_efficiency(hw, rows)) if flops else 0.0
    return _op(hw, t_compute, nbytes / (hw.hbm_bw * hw.hbm_efficiency), 1, flops, nbytes)


@lru_cache(maxsize=None)
def gemm(hw: HardwareProfile, dtype: str, itemsize: int, m: float, n: int, k: int) -> Cost:
    """x `[m, k]` @ w.T `[k, n]` -> `[m, n]`; reads x and w, writes the output (m 0: no work)."""
    if m == 0:
        return Cost(hw.launch_s, "launch")
    return _roofline(hw, dtype, 2.0 * m * n * k, (m * k + k * n + m * n) * itemsize, max(m, 1.0))


@lru_cache(maxsize=None)
def grouped_gemm(hw: HardwareProfile, dtype: str, itemsize: int, rows: tuple[float, ...],
                 n: int, k: int) -> Cost:
    """One grouped matmul over experts: expert e multiplies `[rows[e], k]` by its `[k, n]` weight.

    Only experts that receive rows read their weight; the FLOPs of each expert run at the
    efficiency of its own row count.
    """
    used = [m for m in rows if m > 0]
    if not used:
        return Cost(hw.launch_s, "launch")
    peak = hw.matmul_flops(dtype)
    t_compute = sum(2.0 * m * n * k / (peak * gemm_efficiency(hw, max(m, 1.0))) for m in used)
    flops = sum(2.0 * m * n * k for m in used)
    nbytes = (len(used) * k * n + sum(used) * (k + n)) * itemsize
    return _op(hw, t_compute, nbytes / (hw.hbm_bw * hw.hbm_efficiency), 1, flops, nbytes)


@lru_cache(maxsize=None)
def attention(hw: HardwareProfile, dtype: str, itemsize: int, b: int, L: int, start: int,
              h: int, g: int, d: int) -> Cost:
    """Causal attention of L new positions over start + L cached ones, for b sequences.

    Prefill (start 0): FLOPs grow with L^2. Decode (L 1): the read of S = start + 1 cached K and V,
    `2 b S g d` elements, dominates.
    """
    pairs = b * (L * start + L * (L + 1) / 2)
    flops = 4.0 * h * d * pairs
    kv = 2.0 * b * (start + L) * g * d
    qo = 2.0 * b * L * h * d
    return _roofline(hw, dtype, flops, (kv + qo) * itemsize, max(L * h / g, 1.0))


@lru_cache(maxsize=None)
def elementwise(hw: HardwareProfile, nbytes: float, launches: int) -> Cost:
    """`launches` memory-bound ops that together read and write `nbytes`."""
    return _op(hw, 0.0, nbytes / (hw.hbm_bw * hw.hbm_efficiency), launches, 0.0, nbytes)


@dataclass(frozen=True)
class Link:
    """A link class: per-message latency and one-direction bandwidth per GPU."""

    name: str  # "nvlink" or "network"
    latency_s: float
    bw: float


def nvlink(hw: HardwareProfile) -> Link:
    return Link("nvlink", hw.nvlink_latency_s, hw.nvlink_bw)


def network(hw: HardwareProfile) -> Link:
    return Link("network", hw.net_latency_s, hw.net_bw)


def link_for(hw: HardwareProfile, topology: Topology, ranks) -> Link:
    """The slowest link a group of ranks crosses: the network as soon as it spans two nodes."""
    return network(hw) if topology.spans_nodes(ranks) else nvlink(hw)


def _on(link: Link, seconds: float, nbytes: float) -> Cost:
    moved = {f"{link.name}_bytes": nbytes}
    return Cost(seconds, link.name, **moved)


def send_recv(link: Link, nbytes: float) -> Cost:
    """One point-to-point message."""
    return _on(link, link.latency_s + nbytes / link.bw, nbytes)


def all_reduce(link: Link, nbytes: float, p: int) -> Cost:
    """Ring all-reduce of an `nbytes` buffer over p ranks (reduce-scatter then all-gather)."""
    if p == 1:
        return ZERO
    sent = 2.0 * (p - 1) / p * nbytes
    return _on(link, 2 * (p - 1) * link.latency_s + sent / link.bw, sent)


def all_to_all(hw: HardwareProfile, topology: Topology, ranks: list[int],
               send: list[list[float]]) -> list[Cost]:
    """All-to-all with uneven splits: `send[i][j]` bytes from ranks[i] to ranks[j] -> cost per rank.

    A rank's NVLink and network traffic flow at once; each class takes the larger of what the
    rank sends and receives over it. The collective ends for all when the slowest rank is done
    (the caller takes the max).
    """
    p = len(ranks)
    out = []
    for i in range(p):
        per_class = {"nvlink": [0.0, 0.0, 0], "network": [0.0, 0.0, 0]}  # sent, received, peers
        for j in range(p):
            if i == j:
                continue
            cls = "network" if topology.node_of(ranks[i]) != topology.node_of(ranks[j]) else "nvlink"
            per_class[cls][0] += send[i][j]
            per_class[cls][1] += send[j][i]
            per_class[cls][2] += 1
        parts = []
        for link in (nvlink(hw), network(hw)):
            sent, received, peers = per_class[link.name]
            if peers:
                parts.append(_on(link, peers * link.latency_s + max(sent, received) / link.bw, sent))
        slowest = max(parts, key=lambda c: c.seconds) if parts else ZERO
        out.append(Cost(slowest.seconds, slowest.resource,
                        nvlink_bytes=sum(c.nvlink_bytes for c in parts),
                        network_bytes=sum(c.network_bytes for c in parts)))
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
    out = []
    for i in range(p):
        remote_out = sum(send[i][j] for j in range(p) if node[j] != node[i])
        remote_in = sum(send[j][i] for j in range(p) if node[j] != node[i])
        local_out = sum(send[i][j] for j in range(p) if node[j] == node[i] and j != i)
        # what arrived over the rail for the node's other ranks is forwarded once more
        forwarded = remote_in * (per_node - 1) / per_node
        net = network(hw)
        nv = nvlink(hw)
        t_net = (len(nodes) - 1) * net.latency_s + max(remote_out, remote_in) / net.bw
        t_nv = (per_node - 1) * nv.latency_s + (local_out + forwarded) / nv.bw
        resource = "network" if t_net >= t_nv else "nvlink"
        out.append(Cost(t_net + t_nv, resource, nvlink_bytes=local_out + forwarded,
                        network_bytes=remote_out))
    return out
