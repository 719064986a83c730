"""The native client API: Submit/Abort frames on a ROUTER socket, replies to the sender.

A client (DEALER or REQ-less ROUTER peer) sends a batch of one or more `[header, payload]`
pairs; the ROUTER prepends its identity. Replies (Accepted, TokenDelta, Error) are queued per
identity and leave as one batch per client at the gateway's `flush`. A bad frame costs its
sender one Error; the gateway goes on.

A batch of nothing but `Accepted` waits up to `ACCEPT_HOLD_S` for the request's next reply
(or any other reply to that client) and leaves with it: the client wakes once, and not while
the router and the worker run on the same cores. Order and content are unchanged; only an
Accepted can come up to that much later.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import TYPE_CHECKING

import zmq

from common.protocol import Abort, Accepted, Error, Message, ProtocolError, Submit, decode_batch
from common.sockets import Batch, recv_nowait, send_frames
from services.gateway.intake import GatewayError

if TYPE_CHECKING:
    from services.gateway.main import Gateway

log = logging.getLogger(__name__)

ACCEPT_HOLD_S = 0.002  # longest an Accepted-only batch waits for company (0: never)


class ZmqFrontend:
    def __init__(self, gateway: Gateway, sock: zmq.Socket):
        self.gateway = gateway
        self.sock = sock  # a bound ROUTER
        self.pending: dict[bytes, Batch] = {}  # identity -> queued replies
        self.held_until: dict[bytes, float] = {}  # identity -> when its Accepted-only batch goes
        self.loop = asyncio.get_running_loop()
        self._release: asyncio.TimerHandle | None = None  # flushes the held batches

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
                try:
                    self._on_message(identity, msg)
                except Exception as e:  # a bug: this message gets a 500, the socket goes on
                    log.exception("handling a client's %s failed", type(msg).__name__)
                    self.send(identity, Error(
                        rid=getattr(msg, "rid", ""), code=500,
                        client_tag=getattr(msg, "client_tag", None) or "",
                        message=f"internal error handling {type(msg).__name__}: "
                                f"{type(e).__name__}: {e}"))
        return True

    def _on_message(self, identity: bytes, msg: Message | ProtocolError) -> None:
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
        """Queue `msg` for the client `identity`; it leaves at the next `flush` (an Accepted
        alone: at the first flush after another reply to that client, or ACCEPT_HOLD_S)."""
        batch = self.pending.get(identity)
        if batch is None:
            batch = self.pending[identity] = Batch()
            if type(msg) is Accepted and ACCEPT_HOLD_S > 0:
                self.held_until[identity] = time.monotonic() + ACCEPT_HOLD_S
        elif type(msg) is not Accepted and self.held_until:
            self.held_until.pop(identity, None)
        batch.add(msg)

    def flush(self, force: bool = False) -> bool:
        """Send every client's batch but the held ones not yet due (`force`: those too);
        whether anything was sent."""
        if not self.pending:
            return False
        pending, self.pending = self.pending, {}
        if self.held_until:
            now = time.monotonic()
            for identity, until in list(self.held_until.items()):
                if force or until <= now:
                    del self.held_until[identity]
                else:
                    self.pending[identity] = pending.pop(identity)
        if self.held_until:
            if self._release is None:
                delay_s = min(self.held_until.values()) - time.monotonic()
                self._release = self.loop.call_later(max(0.0, delay_s), self._on_release)
        elif self._release is not None:
            self._release.cancel()
            self._release = None
        if not pending:
            return False
        for identity, batch in pending.items():
            # A ROUTER never blocks: at the high-water mark, or for a gone client, it drops.
            try:
                for frames, _ in batch.frames():
                    send_frames(self.sock, [identity, *frames])
            except zmq.ZMQError as e:
                log.warning("replies to a client were dropped: %s", e)
        return True

    def _on_release(self) -> None:
        self._release = None
        self.gateway.flush(force=True)
