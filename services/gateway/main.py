"""The gateway: the only process clients talk to.

One asyncio loop serves both frontends. Two ZMQ sockets feed it (the native clients'
ROUTER and the gateway's inbox, where workers push Tokens and the router pushes
Error/RequestDone); each has a callback on its ZMQ_FD descriptor (`SocketReaders`) that
drains what is there and flushes (one batch to the router, one per native client), straight
from the loop's wake-up; it never spins. A timer expires deadlines and refreshes the status
file. The aiohttp server (services/gateway/http.py) runs its handlers as tasks
on the same loop and calls `Gateway.submit` / `Gateway.cancel` directly; what they queue
is flushed by a callback scheduled on the loop.
"""

from __future__ import annotations

import asyncio
import gc
import heapq
import logging
import os
import signal
import threading
import time
from typing import Any

import zmq

from common.config import MeshConfig
from common.health import clear_status, write_status
from common.protocol import (
    AbortRequest,
    Accepted,
    Error,
    RequestDone,
    RouteRequest,
    Submit,
    Tokens,
)
from common.sockets import Inbox, Outbox, readable
from services.gateway.intake import GatewayError, prepare
from services.gateway.model_info import model_dir_of, model_name_of, model_vocab_size
from services.gateway.requests import Request, Sink
from services.gateway.waiter import SocketReaders
from services.gateway.zmq_frontend import ZmqFrontend

log = logging.getLogger(__name__)

MAX_DRAIN = 100  # batches per socket per wake, so HTTP handlers are never starved


class Gateway:
    def __init__(self, cfg: MeshConfig, tokenizer: Any | None = None):
        self.cfg = cfg
        self.model_dir = model_dir_of(cfg)
        self.model_name = model_name_of(cfg, self.model_dir)
        if tokenizer is None:
            from transformers import AutoTokenizer

            tokenizer = AutoTokenizer.from_pretrained(str(self.model_dir))
        self.tokenizer = tokenizer
        self.vocab_size = model_vocab_size(self.model_dir) or len(tokenizer)
        self.requests: dict[str, Request] = {}
        self.deadlines: list[tuple[float, str]] = []  # heap; entries of forgotten rids linger
        self.stopping = False
        self.ready = threading.Event()  # set once every socket is bound (tests wait on it)
        self._ctx = zmq.Context()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._main: asyncio.Task | None = None
        self._sockets: list[Any] = []  # closed at shutdown, in this order
        self._flush_scheduled = False
        self._in_turn = False  # a socket's callback is running: it flushes at its end
        self._timer: asyncio.TimerHandle | None = None  # deadlines and the status file
        self._timer_at = float("inf")  # when it fires (time.monotonic)
        self._next_beat = 0.0
        self._open = False  # all sockets are open

    # ---- requests, from either frontend
    def submit(self, submit: Submit, sink: Sink, client: bytes = b"") -> Request:
        """Tokenize, check and route `submit`; replies go to `sink`, Accepted first.
        `client` is a native client's ZMQ identity (only it may abort the request)."""
        if self.stopping:
            raise GatewayError("the gateway is shutting down; retry on another", code=503)
        prepared = prepare(submit, self.tokenizer, self.vocab_size)
        if not self.send_to_router.queued and not self.send_to_router.writable():
            # (a batch counts once against the queue's limit: one look per batch will do)
            raise GatewayError("the router's queue is full; retry later", code=503)
        rid = os.urandom(16).hex()  # as random as uuid4().hex, a third of its cost
        req = Request(rid, submit.client_tag, sink, submit.stream, len(prepared.token_ids),
                      prepared.params, self.tokenizer,
                      time.monotonic() + self.cfg.request_timeout_s, client)
        route = RouteRequest(rid=rid, token_ids=prepared.token_ids,
                             sampling=prepared.params.to_dict(), route=submit.route)
        self.send_to_router.send(route)
        self._flush_soon()
        self.requests[rid] = req
        heapq.heappush(self.deadlines, (req.deadline, rid))
        if req.deadline < self._timer_at and self._timer is not None:
            self._timer.cancel()
            self._arm_timer()
        sink(Accepted(rid=rid, client_tag=submit.client_tag,
                      num_prompt_tokens=req.num_prompt_tokens))
        return req

    def cancel(self, rid: str) -> None:
        """Forget `rid` and tell the router to stop it (its client is gone or gave up)."""
        if self.requests.pop(rid, None) is not None:
            self.send_to_router.send(AbortRequest(rid=rid))
            self._flush_soon()

    def fail(self, rid: str, message: str, code: int, tell_router: bool = True) -> None:
        """End `rid` with an Error to its client; `tell_router`: also abort it there."""
        req = self.requests.pop(rid, None)
        if req is None:
            return
        if tell_router:
            self.send_to_router.send(AbortRequest(rid=rid))
            self._flush_soon()
        req.sink(Error(rid=rid, message=message, code=code))

    def flush(self, force: bool = False) -> None:
        """Send what was queued: to the router first, then every native client's batch
        (`force`: the held ones too, see ZmqFrontend)."""
        self._flush_scheduled = False
        if not self._open:
            return
        for msg in self.send_to_router.flush():
            if isinstance(msg, RouteRequest):
                self.fail(msg.rid, "the router's queue is full; retry later", code=503,
                          tell_router=False)
        if self.clients.flush(force) and readable(self.clients.sock):
            self._loop.call_soon(self._on_clients)  # the send took the socket's wake-up

    def _flush_soon(self) -> None:
        """Make sure a flush follows (the loop's own turn flushes too; HTTP handlers rely on
        this)."""
        if not (self._flush_scheduled or self._in_turn) and self._loop is not None:
            self._flush_scheduled = True
            self._loop.call_soon(self.flush)

    # ---- the loop
    async def serve(self) -> None:
        """Runs until `request_stop` (or SIGTERM/SIGINT in the main thread)."""
        from services.gateway.http import start_http

        self._loop = asyncio.get_running_loop()
        self._main = asyncio.current_task()
        runner = None
        try:
            self._open_sockets()
            runner = await start_http(self, self.cfg.gateway_http)
            if threading.current_thread() is threading.main_thread():
                for sig in (signal.SIGTERM, signal.SIGINT):
                    self._loop.add_signal_handler(sig, self.request_stop)
            log.info("gateway ready: zmq %s, http %s, model %s",
                     self.cfg.gateway_zmq, self.cfg.gateway_http, self.model_name)
            self.ready.set()
            await self._run()
        except asyncio.CancelledError:
            if not self.stopping:
                raise
            if hasattr(self._main, "uncancel"):  # Python >= 3.11
                self._main.uncancel()  # our own stop, not the caller's cancel
        finally:
            await self._shutdown(runner)

    def _open_sockets(self) -> None:
        self.cfg.run_path.mkdir(parents=True, exist_ok=True)
        router = self._ctx.socket(zmq.ROUTER)
        self._sockets.append(router)
        router.setsockopt(zmq.LINGER, 0)
        router.bind(self.cfg.gateway_zmq)
        self.clients = ZmqFrontend(self, router)  # native clients: Submit/Abort in, replies out
        self.send_to_router = Outbox(self._ctx, self.cfg.router_inbox)
        self._sockets.append(self.send_to_router)
        self.recv_from_mesh = Inbox(self._ctx, self.cfg.gateway_inbox)  # Tokens, Error, Done
        self._sockets.append(self.recv_from_mesh)
        self._open = True

    def request_stop(self) -> None:
        """Stop accepting, abort what is in flight, exit; safe from any thread."""
        if self._loop is None or self._loop.is_closed():
            self.stopping = True
        else:
            self._loop.call_soon_threadsafe(self._stop)

    def _stop(self) -> None:
        if not self.stopping:
            self.stopping = True
            if self._main is not None:
                self._main.cancel()

    async def _run(self) -> None:
        """The work is in the callbacks; this waits until `_stop` cancels it."""
        if self.stopping:
            return
        readers = SocketReaders(self._loop)
        readers.add(self.clients.sock, self._on_clients)
        readers.add(self.recv_from_mesh.sock, self._on_mesh)
        self._on_timer()
        try:
            await self._loop.create_future()
        finally:
            readers.close()
            if self._timer is not None:
                self._timer.cancel()

    def _on_clients(self) -> None:
        if not self._open:  # scheduled before shutdown closed the sockets
            return
        self._in_turn = True
        try:
            more = self.clients.drain(MAX_DRAIN)
        finally:
            self._in_turn = False
        self.flush()
        if more:  # stopped at MAX_DRAIN: go on after the loop's other callbacks
            self._loop.call_soon(self._on_clients)

    def _on_mesh(self) -> None:
        if not self._open:
            return
        self._in_turn = True
        try:
            self._drain_mesh()
        finally:
            self._in_turn = False
        self.flush()
        if self.recv_from_mesh.more:
            self._loop.call_soon(self._on_mesh)

    def _on_timer(self) -> None:
        now = time.monotonic()
        if now >= self._next_beat:
            self._write_status()
            self._next_beat = now + self.cfg.heartbeat_s
        self._expire(now)
        self.flush()
        self._arm_timer()

    def _arm_timer(self) -> None:
        """Fire at the next heartbeat or deadline, whichever comes first."""
        wake = min(self._next_beat, self.deadlines[0][0]) if self.deadlines else self._next_beat
        delay_s = max(0.001, wake - time.monotonic())
        self._timer_at = time.monotonic() + delay_s
        self._timer = self._loop.call_later(delay_s, self._on_timer)

    def _write_status(self) -> None:
        write_status(self.cfg.run_path, "gateway", role="gateway", zmq=self.cfg.gateway_zmq,
                     http=f"http://{self.cfg.gateway_http}", model=self.model_name,
                     num_requests=len(self.requests))

    def _expire(self, now: float) -> None:
        while self.deadlines and self.deadlines[0][0] <= now:
            _, rid = heapq.heappop(self.deadlines)
            if rid in self.requests:
                self.fail(rid, f"request {rid} timed out after {self.cfg.request_timeout_s:g} s "
                          "(request_timeout_s)", code=504)
        if len(self.deadlines) > 2 * len(self.requests) + 1000:  # drop finished requests' entries
            self.deadlines = [(d, rid) for d, rid in self.deadlines if rid in self.requests]
            heapq.heapify(self.deadlines)

    # ---- workers and the router
    def _drain_mesh(self) -> None:
        for msg in self.recv_from_mesh.drain(MAX_DRAIN):
            try:
                if isinstance(msg, Tokens):
                    self._on_tokens(msg)
                elif isinstance(msg, Error):
                    self.fail(msg.rid, msg.message, msg.code, tell_router=False)
                elif isinstance(msg, RequestDone):
                    self._on_done(msg)
                else:
                    log.warning("the gateway inbox got a %s; it takes Tokens, Error, "
                                "RequestDone", type(msg).__name__)
            except Exception as e:  # a bug: fail that request, not the gateway's loop
                log.exception("handling a %s from the mesh failed", type(msg).__name__)
                rid = getattr(msg, "rid", "")
                if rid in self.requests:
                    self.fail(rid, f"internal error in the gateway: {type(e).__name__}: {e}",
                              500)

    def _on_tokens(self, msg: Tokens) -> None:
        req = self.requests.get(msg.rid)
        if req is None:
            return  # aborted, failed or timed out already
        deltas = req.on_tokens(msg)
        if req.finished:
            del self.requests[msg.rid]
        for delta in deltas:
            req.sink(delta)

    def _on_done(self, msg: RequestDone) -> None:
        """Tokens travel worker -> gateway and may still be on their way, so only a failed or
        aborted request is ended here."""
        req = self.requests.get(msg.rid)
        if req is None:
            return
        if msg.error:
            self.fail(msg.rid, msg.error, code=500, tell_router=False)
        elif msg.finish_reason == "abort":
            del self.requests[msg.rid]
            for delta in req.abort():
                req.sink(delta)

    # ---- shutdown
    async def _shutdown(self, runner: Any | None) -> None:
        self.stopping = True
        for rid in list(self.requests):
            self.fail(rid, "the gateway is shutting down", code=503)
        self.flush()
        if runner is not None:
            await asyncio.sleep(0.05)  # let HTTP handlers write the errors they just got
            await runner.cleanup()  # bounded by the runner's shutdown_timeout
        self.flush(force=True)  # what the handlers queued meanwhile, and held replies
        self._open = False
        for sock in self._sockets:
            sock.close()  # the outbox lingers to deliver the AbortRequests
        self._ctx.term()
        clear_status(self.cfg.run_path, "gateway")
        log.info("gateway stopped")


def run_gateway(cfg: MeshConfig) -> None:
    """Serve until SIGTERM/SIGINT; blocking."""
    gateway = Gateway(cfg)
    gc.freeze()  # the tokenizer and the imports are long-lived: keep them out of every gc pass
    asyncio.run(gateway.serve())
