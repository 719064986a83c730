"""The native client API: Submit/Abort frames on a ROUTER socket, replies to the sender.

A client (DEALER or REQ-less ROUTER peer) sends `[header, payload]`; the ROUTER prepends its
identity. Replies (Accepted, TokenDelta, Error) go back to that identity. A bad frame costs
its sender one Error; the gateway goes on.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

import zmq
import zmq.asyncio

from common.protocol import Abort, Error, Message, ProtocolError, Submit, decode, encode
from common.sockets import send_frames
from services.gateway.intake import GatewayError

if TYPE_CHECKING:
    from services.gateway.main import Gateway

log = logging.getLogger(__name__)


_NOBLOCK = int(zmq.NOBLOCK)


def recv_nowait(sock: zmq.Socket) -> list[bytes] | None:
    """The next multipart message if one is waiting, else None; never waits.

    Pass a plain (synchronous) socket: the asyncio wrapper's futures cost more than the
    receive itself on this hot path.
    """
    try:
        return sock.recv_multipart(_NOBLOCK)
    except zmq.Again:
        return None


def sync_shadow(sock: zmq.Socket) -> zmq.Socket:
    """A plain socket over the same underlying ZMQ socket (for non-blocking calls)."""
    return zmq.Socket.shadow(sock.underlying)


class ZmqFrontend:
    def __init__(self, gateway: Gateway, sock: zmq.asyncio.Socket):
        self.gateway = gateway
        self.sock = sock  # a bound ROUTER (asyncio: the loop polls it)
        self.sync = sync_shadow(sock)  # the same socket, for non-blocking recv/send

    def drain(self, limit: int) -> None:
        """Handle up to `limit` waiting client messages."""
        for _ in range(limit):
            frames = recv_nowait(self.sync)
            if frames is None:
                return
            identity, body = frames[0], frames[1:]
            try:
                msg = decode(body)
            except ProtocolError as e:
                self.send(identity, Error(message=f"bad frame: {e}", code=400))
                continue
            if isinstance(msg, Submit):
                self._on_submit(identity, msg)
            elif isinstance(msg, Abort):
                self._on_abort(identity, msg)
            else:
                self.send(identity, Error(code=400, message=(
                    f"the gateway's client socket takes Submit and Abort, "
                    f"not {type(msg).__name__}")))

    def _on_submit(self, identity: bytes, msg: Submit) -> None:
        def sink(reply: Message) -> None:
            self.send(identity, reply)

        try:
            self.gateway.submit(msg, sink, client=identity)
        except GatewayError as e:
            self.send(identity, Error(message=e.message, code=e.code, client_tag=msg.client_tag))

    def _on_abort(self, identity: bytes, msg: Abort) -> None:
        req = self.gateway.requests.get(msg.rid)
        if req is None or req.client != identity:
            self.send(identity, Error(rid=msg.rid, code=404,
                                      message=f"no request {msg.rid!r} of yours is in flight"))
            return
        self.gateway.cancel(msg.rid)
        for delta in req.abort():
            req.sink(delta)

    def send(self, identity: bytes, msg: Message) -> None:
        # A ROUTER never blocks: at the high-water mark, or for a gone client, it drops.
        try:
            send_frames(self.sync, [identity, *encode(msg)])
        except zmq.ZMQError as e:
            log.warning("a reply to a client was dropped: %s", e)
