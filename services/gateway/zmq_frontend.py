"""The native client API: Submit/Abort frames on a ROUTER socket, replies to the sender.

A client (DEALER or REQ-less ROUTER peer) sends a batch of one or more `[header, payload]`
pairs; the ROUTER prepends its identity. Replies (Accepted, TokenDelta, Error) are queued per
identity and leave as one batch per client at the gateway's `flush`. A bad frame costs its
sender one Error; the gateway goes on.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

import zmq

from common.protocol import Abort, Error, Message, ProtocolError, Submit, decode_batch
from common.sockets import Batch, recv_nowait, send_frames
from services.gateway.intake import GatewayError

if TYPE_CHECKING:
    from services.gateway.main import Gateway

log = logging.getLogger(__name__)


class ZmqFrontend:
    def __init__(self, gateway: Gateway, sock: zmq.Socket):
        self.gateway = gateway
        self.sock = sock  # a bound ROUTER
        self.pending: dict[bytes, Batch] = {}  # identity -> queued replies

    def drain(self, limit: int) -> bool:
        """Handle the client messages waiting now (up to `limit` batches); whether it
        stopped at the limit (more may be waiting)."""
        for _ in range(limit):
            frames = recv_nowait(self.sock)
            if frames is None:
                return False
            identity = frames[0]
            try:
                decoded = decode_batch(frames[1:])
            except ProtocolError as e:
                self.send(identity, Error(message=f"bad frame: {e}", code=400))
                continue
            for msg in decoded:
                if isinstance(msg, Submit):
                    self._on_submit(identity, msg)
                elif isinstance(msg, Abort):
                    self._on_abort(identity, msg)
                elif isinstance(msg, ProtocolError):
                    self.send(identity, Error(message=f"bad frame: {msg}", code=400))
                else:
                    self.send(identity, Error(code=400, message=(
                        f"the gateway's client socket takes Submit and Abort, "
                        f"not {type(msg).__name__}")))
        return True

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
        """Queue `msg` for the client `identity`; it leaves at the next `flush`."""
        batch = self.pending.get(identity)
        if batch is None:
            batch = self.pending[identity] = Batch()
        batch.add(msg)

    def flush(self) -> bool:
        """Send every client's batch; whether there were any."""
        if not self.pending:
            return False
        pending, self.pending = self.pending, {}
        for identity, batch in pending.items():
            # A ROUTER never blocks: at the high-water mark, or for a gone client, it drops.
            try:
                for frames, _ in batch.frames():
                    send_frames(self.sock, [identity, *frames])
            except zmq.ZMQError as e:
                log.warning("replies to a client were dropped: %s", e)
        return True
