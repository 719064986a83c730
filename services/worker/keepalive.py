"""Heartbeats while the worker's loop is inside a long step.

The worker heartbeats once per loop turn, and a turn that runs one long engine step (a big
prefill on a CPU takes seconds) would starve the router's liveness check: the router then
fails every request on that worker as "stopped responding" although it computes. So a small
thread re-sends the loop's latest Heartbeat every `interval_s` while the loop is silent, over
its own socket (ZMQ sockets are not shared between threads). It stops vouching after
`stale_after_s` without a word from the loop: a worker that is truly stuck is declared dead
by the router, as before, only later.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

import zmq

from common.protocol import Heartbeat, encode


class KeepAlive:
    def __init__(self, ctx: zmq.Context, router_address: str, interval_s: float,
                 stale_after_s: float, clock: Callable[[], float] = time.monotonic):
        self.ctx, self.router_address = ctx, router_address
        self.interval_s, self.stale_after_s, self.clock = interval_s, stale_after_s, clock
        self.latest: Heartbeat | None = None  # the loop's last heartbeat (never mutated)
        self.noted_at = clock()               # when the loop last sent one itself
        self.sent_at = self.noted_at          # when anyone last sent one
        self.num_resent = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def note(self, beat: Heartbeat) -> None:
        """The loop sent `beat` itself (called from the loop's thread)."""
        self.latest, self.noted_at = beat, self.clock()
        self.sent_at = self.noted_at

    def due(self, now: float) -> bool:
        """Whether to re-send now: the loop has a heartbeat, is silent for an interval, and
        not for so long that it may be stuck."""
        return (self.latest is not None and now - self.sent_at >= self.interval_s
                and now - self.noted_at < self.stale_after_s)

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="keepalive", daemon=True)
        self._thread.start()

    def stop(self, timeout_s: float = 2.0) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout_s)

    def _run(self) -> None:
        sock = self.ctx.socket(zmq.PUSH)
        sock.setsockopt(zmq.LINGER, 0)
        sock.setsockopt(zmq.SNDHWM, 4)
        sock.connect(self.router_address)
        try:
            while not self._stop.wait(self.interval_s / 2):
                now = self.clock()
                beat = self.latest
                if beat is None or not self.due(now):
                    continue
                try:
                    sock.send_multipart(encode(beat), flags=zmq.NOBLOCK)
                    self.sent_at, self.num_resent = now, self.num_resent + 1
                except zmq.Again:  # the router's queue is full: it is not listening anyway
                    pass
        finally:
            sock.close()
