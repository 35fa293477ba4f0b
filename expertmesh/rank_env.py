"""The environment a rank sets before it creates its process group: the interface gloo binds, and
NCCL's diagnostics. Each rule is a pure function of the environment it reads, so it is tested
without a network or a GPU.

gloo binds the interface its host name resolves to unless `GLOO_SOCKET_IFNAME` says otherwise;
where the name resolves to loopback (common in containers and on cluster nodes) a multi-node run's
gloo groups (the control group and the EP/TP groups' gloo twins) then wait for peers that can never
reach them. So a rank under torchrun picks the interface itself, unless the user did:

  1. `GLOO_SOCKET_IFNAME` already set: kept;
  2. `NCCL_SOCKET_IFNAME` names interfaces (`eth0`, `=ib0`, `eth0,eth1`): gloo takes the first, so
     both libraries use the network the user chose (an exclusion list, `^docker`, names none);
  3. else the interface whose address routes to `MASTER_ADDR` (the source address the kernel
     picks for it), the network the rendezvous itself uses;
  4. all on one node (`LOCAL_WORLD_SIZE == WORLD_SIZE`), or `MASTER_ADDR` `localhost` or a
     loopback address (every "node" on this host, as tests run two): loopback is right and is used when the route
     finds nothing better; across nodes a host name that leads to loopback (`/etc/hosts` mapping
     the node's own name to 127.0.1.1) is an error, never a choice.
"""

from __future__ import annotations

import contextlib
import fcntl
import ipaddress
import os
import socket
import struct
from collections.abc import Callable, Mapping

LOOPBACK = "lo"  # Linux's loopback interface, where gloo binds for a local run
# When a collective times out, each rank writes its last collectives (the flight recorder) to a
# file: which one every rank was in. The buffer's variable was renamed (TORCH_FR_*); both are set.
NCCL_DIAGNOSTICS = {"TORCH_NCCL_DUMP_ON_TIMEOUT": "1", "TORCH_NCCL_TRACE_BUFFER_SIZE": "2000",
                    "TORCH_FR_BUFFER_SIZE": "2000"}
_SIOCGIFADDR = 0x8915  # Linux ioctl: an interface's IPv4 address


def nccl_diagnostic_defaults(env: Mapping[str, str]) -> dict[str, str]:
    """The diagnostics variables to add: each of `NCCL_DIAGNOSTICS` the user has not set."""
    return {k: v for k, v in NCCL_DIAGNOSTICS.items() if k not in env}


def multi_node(env: Mapping[str, str]) -> bool:
    """torchrun started ranks on more than one node (its LOCAL_WORLD_SIZE < WORLD_SIZE)."""
    return int(env.get("LOCAL_WORLD_SIZE", env["WORLD_SIZE"])) < int(env["WORLD_SIZE"])


def gloo_interface(env: Mapping[str, str], route_to: Callable[[str], str | None],
                   interfaces: Mapping[str, str]) -> str:
    """The interface gloo should bind, by the rules above. `route_to(host)`: the local IPv4
    address the kernel would send to `host` from (None if it cannot tell); `interfaces`: IPv4
    address -> interface name on this machine. Raises ValueError (a one-line fix) where a
    multi-node run would bind loopback."""
    if env.get("GLOO_SOCKET_IFNAME"):
        return env["GLOO_SOCKET_IFNAME"]
    nccl = env.get("NCCL_SOCKET_IFNAME", "").lstrip("=")
    if nccl and not nccl.startswith("^"):
        return nccl.split(",")[0]
    master = env.get("MASTER_ADDR", "127.0.0.1")
    source = route_to(master)
    name = interfaces.get(source) if source else None
    across = multi_node(env) and not _loopback_literal(master)
    if name and not (across and name == LOOPBACK):
        return name
    if not across:
        return LOOPBACK
    raise ValueError(f"MASTER_ADDR {master} is reached through {name or 'no known interface'} on "
                     f"this node, but the run spans nodes; set GLOO_SOCKET_IFNAME (and "
                     f"NCCL_SOCKET_IFNAME) to the interface of the network between the nodes, or "
                     f"give MASTER_ADDR as that network's address")


def _loopback_literal(host: str) -> bool:
    """`localhost` or a loopback address: no other host can reach it, so every rank is here."""
    with contextlib.suppress(ValueError):
        return ipaddress.ip_address(host).is_loopback
    return host == "localhost"


def route_source(host: str) -> str | None:
    """The local IPv4 address the kernel picks to send to `host` (a UDP connect: no packet)."""
    with contextlib.suppress(OSError), socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.connect((socket.gethostbyname(host), 9))
        return s.getsockname()[0]
    return None


def ipv4_interfaces() -> dict[str, str]:
    """IPv4 address -> interface name, for every interface of this machine that has one."""
    out = {}
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        for _, name in socket.if_nameindex():
            with contextlib.suppress(OSError):
                packed = fcntl.ioctl(s.fileno(), _SIOCGIFADDR, struct.pack("256s", name.encode()[:15]))
                out[socket.inet_ntoa(packed[20:24])] = name
    return out


def prepare_torchrun_rank(backend: str) -> None:
    """Set this torchrun rank's gloo interface and, under NCCL, the diagnostics defaults."""
    os.environ["GLOO_SOCKET_IFNAME"] = gloo_interface(os.environ, route_source, ipv4_interfaces())
    if backend == "nccl":
        os.environ.update(nccl_diagnostic_defaults(os.environ))


def prepare_local_rank(backend: str) -> None:
    """A local run stays on loopback: gloo binds it, and NCCL's bootstrap does unless told."""
    os.environ["GLOO_SOCKET_IFNAME"] = LOOPBACK
    if backend == "nccl":
        os.environ.setdefault("NCCL_SOCKET_IFNAME", LOOPBACK)
        os.environ.update(nccl_diagnostic_defaults(os.environ))
