"""Reading ZMQ sockets from an asyncio loop: a callback per socket, on its ZMQ_FD descriptor.

A ZMQ socket's `ZMQ_FD` becomes readable when the socket's state may have changed; it is
edge-triggered: reading `ZMQ_EVENTS` (or a receive, or a send) consumes the signal. So the
rule is "look before you sleep": a callback must leave its socket with `ZMQ_EVENTS` read
after the last operation on it (a drain ends with that look; a socket it also sends on
needs one more after the send, `readable`). The loop's own `add_reader` calls it
straight from the wake-up: no future, task switch or timer per wait.

Before (a coroutine awaiting a future per wait, 2026-12-01, this 2-core machine, one request
in flight): the wake-up to the gateway's turn took ~45 us more than the router's blocking
`zmq_poll`, twice per request (bench/results/README.md, "Control-plane overhead").
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable

import zmq


class SocketReaders:
    """Calls a socket's callback from `loop` whenever its `ZMQ_FD` fires; `close` stops."""

    def __init__(self, loop: asyncio.AbstractEventLoop):
        self.loop = loop
        self.fds: list[int] = []

    def add(self, sock: zmq.Socket, callback: Callable[[], None]) -> None:
        """Watch `sock`; `callback` runs once now too (for what came before the watch)."""
        fd = sock.getsockopt(zmq.FD)
        self.fds.append(fd)
        self.loop.add_reader(fd, callback)
        self.loop.call_soon(callback)

    def close(self) -> None:
        for fd in self.fds:
            self.loop.remove_reader(fd)
        self.fds.clear()
