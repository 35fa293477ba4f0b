"""Break this process's TCP connections, so that a collective waiting on a dead peer returns.

A gloo collective blocked on a rank that is still alive, but itself blocked on the dead one,
waits for the group's whole timeout. Shutting down this process's TCP sockets makes every gloo
operation of the old groups fail at once ("Connection closed by peer"), on every survivor, so
that all of them leave the collective they were in and meet in the new groups.

Only gloo's pairs are connected TCP sockets in a local rank: the file store is a file, the API servers'
channel (`server/ipc.py`) a Unix socket, and the HTTP listener belongs to the API servers. The
sockets are shut down, not closed: their descriptors stay gloo's, which closes them when the old
groups are destroyed.
"""

from __future__ import annotations

import contextlib
import os
import socket

TCP_FAMILIES = (socket.AF_INET, socket.AF_INET6)


def tcp_sockets() -> list[int]:
    """This process's connected TCP stream sockets, by file descriptor: not the listening ones
    (gloo's listener thread aborts the process when its accept fails)."""
    out = []
    for name in os.listdir("/proc/self/fd"):
        fd = int(name)
        try:
            if not os.readlink(f"/proc/self/fd/{fd}").startswith("socket:"):
                continue
            probe = socket.socket(fileno=os.dup(fd))
        except OSError:  # closed meanwhile, or not a socket after all
            continue
        with probe:
            if (probe.family in TCP_FAMILIES and probe.type == socket.SOCK_STREAM
                    and not probe.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN)):
                out.append(fd)
    return out


def break_connections() -> int:
    """Shut down (both ways) every TCP socket of this process; returns how many."""
    broken = 0
    for fd in tcp_sockets():
        with contextlib.suppress(OSError):
            with socket.socket(fileno=os.dup(fd)) as twin:  # the dup shares the connection
                twin.shutdown(socket.SHUT_RDWR)
                broken += 1
    return broken
