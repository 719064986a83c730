"""Waiting on ZMQ sockets from an asyncio loop, through their ZMQ_FD descriptors.

A ZMQ socket's `ZMQ_FD` becomes readable when the socket's state may have changed; it is
edge-triggered: reading `ZMQ_EVENTS` (or a receive) consumes the signal. So the rule is
"look, and wait only if nothing is there": `wait` reads `ZMQ_EVENTS` of every socket and
only then waits for one of the descriptors (the loop's own `add_reader`) or the timeout.
zmq.asyncio's Poller does the same with futures and callbacks per socket and per poll;
this costs one future per wait. In a stand-in of the mesh's five hops with trivial handlers
(this 2-core machine, shared, 2026-12-01) the round trip's p50 was 0.50-0.53 ms with this
wait against 0.58-0.77 ms with zmq.asyncio's Poller.
"""

from __future__ import annotations

import asyncio

import zmq

from common.sockets import readable


class SocketWaiter:
    def __init__(self, loop: asyncio.AbstractEventLoop, socks: list[zmq.Socket]):
        self.loop = loop
        self.socks = socks
        self.fds = [s.getsockopt(zmq.FD) for s in socks]
        self._waiting: asyncio.Future | None = None
        self.num_idle_wakes = 0  # woken with nothing to read
        for fd in self.fds:
            loop.add_reader(fd, self._wake)

    def _wake(self) -> None:
        if self._waiting is not None and not self._waiting.done():
            self._waiting.set_result(None)

    async def wait(self, timeout_s: float) -> None:
        """Return once a socket has a message waiting, or after `timeout_s`. With something
        already waiting it still yields to the loop once, so other tasks run between turns.
        A descriptor also fires for socket events other than a message (ZMQ's own commands):
        such a wake-up goes back to waiting here instead of costing the caller a turn."""
        if self._any_readable():
            await asyncio.sleep(0)
            return
        deadline = self.loop.time() + timeout_s
        while True:
            self._waiting = self.loop.create_future()
            timer = self.loop.call_at(deadline, self._wake)
            try:
                await self._waiting
            finally:
                timer.cancel()
                self._waiting = None
            if self._any_readable() or self.loop.time() >= deadline:
                return
            self.num_idle_wakes += 1

    def _any_readable(self) -> bool:
        for sock in self.socks:
            if readable(sock):
                return True
        return False

    def close(self) -> None:
        for fd in self.fds:
            self.loop.remove_reader(fd)
