"""Bounds on the HTTP connections of an API server process, against slow or idle clients
(slowloris) and file-descriptor exhaustion: uvicorn's h11 protocol with a connection limit and
header / body timeouts; its own keep-alive timeout does the rest. (`GuardedProtocol` builds on
`H11Protocol`'s internals: uvicorn's version is pinned in constraints.txt.)

- Past `max_connections` open connections, a new one gets a 503 in OpenAI's error format and is
  closed at once (the application never sees it).
- A request's headers must all arrive within `header_s` of its first byte (of the connection's
  opening, for its first request), and its body within `body_s` of its headers: else a 408 in
  OpenAI's error format (just a close if the response already began) and the connection ends.
- A connection idle between requests is closed after `keep_alive_s`.

`uvicorn_options(limits)` is the one thing the front end takes from here: keyword arguments of
`uvicorn.Config`. A refused accept (the process is out of file descriptors) is one log line, not
one traceback per try (`quiet_accept_errors`).
"""

from __future__ import annotations

import asyncio
import json
import resource
import sys
import time
from dataclasses import dataclass

import h11
from uvicorn.protocols.http.h11_impl import H11Protocol

from expertmesh.server.protocol import ApiError

ACCEPT_LOG_EVERY_S = 10.0  # at most one line per this long while accepts fail


@dataclass(frozen=True)
class ConnectionLimits:
    """Per API server process: open connections, and seconds for a request's headers, for its
    body once the headers are in, and for an idle keep-alive connection."""

    max_connections: int = 1024
    header_s: float = 30.0
    body_s: float = 60.0
    keep_alive_s: float = 5.0

    def __post_init__(self) -> None:
        if not (isinstance(self.max_connections, int) and self.max_connections >= 1):
            raise ValueError(f"--max-connections {self.max_connections} must be an integer >= 1")
        for name, flag in (("header_s", "--header-timeout"), ("body_s", "--body-timeout"),
                           ("keep_alive_s", "--keep-alive-timeout")):
            value = getattr(self, name)
            if not 0 < value < float("inf"):
                raise ValueError(f"{flag} {value} must be a positive number of seconds")


def uvicorn_options(limits: ConnectionLimits) -> dict:
    """`uvicorn.Config` keyword arguments that enforce `limits` (and raise this process's file
    descriptor limit to what the system allows, so that the connection limit comes first)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))

    class Guarded(GuardedProtocol):
        bounds = limits
    return dict(http=Guarded, timeout_keep_alive=limits.keep_alive_s)


def _raw_error(status: int, reason: str, message: str) -> bytes:
    """A whole HTTP/1.1 response carrying an OpenAI error body; the connection closes after it."""
    body = json.dumps(ApiError(status, message, kind="invalid_request_error" if status < 500
                               else "server_error").body()).encode()
    return (f"HTTP/1.1 {status} {reason}\r\ncontent-type: application/json\r\n"
            f"content-length: {len(body)}\r\nconnection: close\r\n\r\n").encode() + body


class GuardedProtocol(H11Protocol):
    """uvicorn's h11 protocol under `bounds` (see the module's docstring)."""

    bounds: ConnectionLimits
    refused = False
    guard: asyncio.TimerHandle | None = None
    phase: str | None = None  # "header" or "body": what the armed timer waits for

    def connection_made(self, transport) -> None:
        if len(self.server_state.connections) >= self.bounds.max_connections:
            self.refused = True
            transport.write(_raw_error(503, "Service Unavailable", f"the server has "
                                       f"{self.bounds.max_connections} connections open "
                                       f"(--max-connections); retry later"))
            transport.close()
            return
        super().connection_made(transport)
        self._arm("header")

    def connection_lost(self, exc) -> None:
        if self.refused:
            return
        self._disarm()
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        super().data_received(data)
        self._follow()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        self._follow()

    def _follow(self) -> None:
        """Arm the timer for what the request still owes: headers, then its body, then nothing.
        An idle connection between requests is the keep-alive timer's."""
        state = self.conn.their_state
        if self.transport.is_closing() or state not in (h11.IDLE, h11.SEND_BODY):
            self._disarm()
        elif state is h11.SEND_BODY:
            self._arm("body")
        elif self.timeout_keep_alive_task is None and self.phase is None:  # bytes of a new request
            self._arm("header")

    def _arm(self, phase: str) -> None:
        if self.phase == phase:
            return
        self._disarm()
        self.phase = phase
        self.guard = self.loop.call_later(self.bounds.header_s if phase == "header" else self.bounds.body_s,
                                          self._expired)

    def _disarm(self) -> None:
        if self.guard is not None:
            self.guard.cancel()
        self.guard, self.phase = None, None

    def _expired(self) -> None:
        what, flag, seconds = (("headers", "--header-timeout", self.bounds.header_s) if self.phase == "header"
                               else ("body", "--body-timeout", self.bounds.body_s))
        self.guard, self.phase = None, None
        if self.transport.is_closing():
            return
        if self.cycle is None or not self.cycle.response_started:
            self.transport.write(_raw_error(408, "Request Timeout", f"the request's {what} did not "
                                            f"arrive within {seconds:g} s ({flag})"))
        self.transport.close()


def quiet_accept_errors(loop: asyncio.AbstractEventLoop) -> None:
    """asyncio logs a traceback for every accept that fails for want of file descriptors (and
    retries each second): log one line at most every `ACCEPT_LOG_EVERY_S` instead."""
    last = [float("-inf")]

    def handler(loop, context):
        if "accept" not in context.get("message", ""):
            return loop.default_exception_handler(context)
        now = time.monotonic()
        if now - last[0] >= ACCEPT_LOG_EVERY_S:
            last[0] = now
            print(f"warning: cannot accept a connection ({context.get('exception')}); "
                  f"lower --max-connections or raise the file limit", file=sys.stderr, flush=True)
    loop.set_exception_handler(handler)
