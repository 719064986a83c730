"""Typed ZeroMQ sockets: an inbox every service binds, outboxes that push to other inboxes."""

from __future__ import annotations

import logging

import zmq

from common.protocol import Message, ProtocolError, decode, encode

log = logging.getLogger(__name__)

_NOBLOCK = int(zmq.NOBLOCK)  # plain ints: pyzmq's enum flag arithmetic costs more than a send
_NOBLOCK_MORE = int(zmq.NOBLOCK) | int(zmq.SNDMORE)

LINGER_MS = 1000  # a closing socket gets this long to flush (a final error, a dead notice)
SNDHWM = 100_000


def send_frames(sock: zmq.Socket, frames: list[bytes]) -> None:
    """send_multipart without blocking; raises zmq.Again when the peer's queue is full."""
    for frame in frames[:-1]:
        sock.send(frame, _NOBLOCK_MORE, copy=True)
    sock.send(frames[-1], _NOBLOCK, copy=True)


class Inbox:
    """A bound PULL socket; `recv` decodes, and a bad frame is logged and dropped."""

    def __init__(self, ctx: zmq.Context, address: str):
        self.address = address
        self.sock = ctx.socket(zmq.PULL)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.bind(address)

    def poll(self, timeout_ms: int) -> bool:
        return bool(self.sock.poll(timeout_ms))

    def recv(self, timeout_ms: int = 0) -> Message | None:
        """The next message, waiting at most `timeout_ms`; None if nothing (valid) came."""
        if not self.sock.poll(timeout_ms):
            return None
        return self._decode(self.sock.recv_multipart())

    def drain(self, limit: int = 10_000) -> list[Message]:
        """Everything waiting now (up to `limit`), without blocking."""
        out: list[Message] = []
        while len(out) < limit:
            try:
                frames = self.sock.recv_multipart(_NOBLOCK)
            except zmq.Again:
                break
            msg = self._decode(frames)
            if msg is not None:
                out.append(msg)
        return out

    def _decode(self, frames: list[bytes]) -> Message | None:
        try:
            return decode(frames)
        except ProtocolError as e:
            log.warning("dropped a bad frame on %s: %s", self.address, e)
            return None

    def close(self) -> None:
        self.sock.close()


class Outbox:
    """A PUSH socket connected to another service's inbox; never blocks the sender."""

    def __init__(self, ctx: zmq.Context, address: str):
        self.address = address
        self.sock = ctx.socket(zmq.PUSH)
        self.sock.setsockopt(zmq.LINGER, LINGER_MS)
        self.sock.setsockopt(zmq.SNDHWM, SNDHWM)
        self.sock.connect(address)

    def send(self, msg: Message) -> bool:
        """False if the peer's queue is full (the message is dropped, and said so)."""
        try:
            send_frames(self.sock, encode(msg))
            return True
        except zmq.Again:
            log.error("queue to %s is full; dropped %s", self.address, type(msg).__name__)
            return False

    def close(self) -> None:
        self.sock.close()


class Outboxes:
    """Outboxes by address, opened on first use."""

    def __init__(self, ctx: zmq.Context):
        self.ctx = ctx
        self.boxes: dict[str, Outbox] = {}

    def send(self, address: str, msg: Message) -> bool:
        box = self.boxes.get(address)
        if box is None:
            box = self.boxes[address] = Outbox(self.ctx, address)
        return box.send(msg)

    def close(self) -> None:
        for box in self.boxes.values():
            box.close()
