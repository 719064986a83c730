"""The router service: owns the decision and tracks every request to its end.

Loop: drain the inbox (gateway requests, worker heartbeats and replies) -> check timeouts
-> refresh status -> flush (one batch per peer). It blocks on the inbox; timeouts are
checked at least every heartbeat.
"""

from __future__ import annotations

import gc
import logging
import signal
import time
from collections import Counter
from dataclasses import dataclass, field

import zmq

from common.config import MeshConfig
from common.health import clear_status, write_status
from common.protocol import (
    AbortRequest,
    Error,
    Heartbeat,
    Message,
    RequestDone,
    Reserve,
    Reserved,
    RouteRequest,
    Run,
)
from common.sockets import Inbox, Outboxes
from services.router.policy import Decision, RulePolicy, WorkerView

log = logging.getLogger("nanopd.router")

RESERVE_TIMEOUT_S = 10.0


@dataclass
class Tracked:
    req: RouteRequest
    decision: Decision
    stage: str  # running | reserving | prefill
    deadline: float
    stage_deadline: float = 0.0
    legs: set[str] = field(default_factory=set)
    tried_decodes: set[str] = field(default_factory=set)


class Router:
    def __init__(self, cfg: MeshConfig):
        self.cfg = cfg
        self.policy = RulePolicy(cfg.strategy)
        self.ctx = zmq.Context()
        self.inbox = Inbox(self.ctx, cfg.router_inbox)
        self.gateway_address = cfg.gateway_inbox
        self.out = Outboxes(self.ctx)
        self.workers: dict[str, WorkerView] = {}
        self.requests: dict[str, Tracked] = {}
        self.paths: Counter[str] = Counter()
        self.stopping = False
        self.dead_after_s = max(3.0, 6 * cfg.heartbeat_s)
        self._live: list[WorkerView] | None = None  # this loop turn's live_workers()

    # ---- helpers
    def live_workers(self) -> list[WorkerView]:
        """Workers heard from within `dead_after_s`; computed once per loop turn (and again
        after a heartbeat), not once per request."""
        if self._live is None:
            now = time.monotonic()
            self._live = [w for w in self.workers.values()
                          if now - w.last_seen < self.dead_after_s]
        return self._live

    def send_worker(self, name: str, msg: Message) -> None:
        w = self.workers.get(name)
        if w is not None:
            self.out.send(w.beat.address, msg)

    def fail(self, rid: str, message: str, code: int) -> None:
        t = self.requests.pop(rid, None)
        if t is None:
            return
        log.warning("request %s failed: %s", rid, message)
        self.out.send(self.gateway_address, Error(rid=rid, message=message, code=code))
        self.end_legs(t)
        self.paths["failed"] += 1

    def end_legs(self, t: Tracked, except_worker: str = "") -> None:
        for name in t.legs:
            w = self.workers.get(name)
            if w is not None:
                w.inflight = max(0, w.inflight - 1)
            if name != except_worker:
                self.send_worker(name, AbortRequest(rid=t.req.rid))

    # ---- messages
    def handle_guarded(self, msg: Message) -> None:
        """`handle`, where an unexpected exception (a bug) fails that message's request with
        a 500 (the gateway is told even of a request not tracked yet) and the loop goes on."""
        try:
            self.handle(msg)
        except Exception as e:
            log.exception("handling a %s failed", type(msg).__name__)
            rid, why = getattr(msg, "rid", ""), f"{type(e).__name__}: {e}"
            if rid in self.requests:
                self.fail(rid, f"internal error in the router: {why}", 500)
            elif isinstance(msg, RouteRequest):
                self.out.send(self.gateway_address, Error(
                    rid=rid, code=500, message=f"internal error in the router: {why}"))

    def handle(self, msg: Message) -> None:
        if isinstance(msg, Heartbeat):
            self._live = None
            view = self.workers.get(msg.worker)
            if view is None or view.beat.pid != msg.pid:
                log.info("worker %s (%s on %s, pid %d) registered", msg.worker, msg.role,
                         msg.device, msg.pid)
                self.workers[msg.worker] = WorkerView(msg, inflight=view.inflight if view else 0)
            else:
                view.beat, view.last_seen = msg, time.monotonic()
        elif isinstance(msg, RouteRequest):
            self.on_route(msg)
        elif isinstance(msg, Reserved):
            self.on_reserved(msg)
        elif isinstance(msg, RequestDone):
            self.on_done(msg)
        elif isinstance(msg, AbortRequest):
            t = self.requests.pop(msg.rid, None)
            if t is not None:
                self.end_legs(t)
                self.paths["aborted"] += 1
        else:
            log.warning("unexpected %s on the router inbox; dropped", type(msg).__name__)

    def on_route(self, req: RouteRequest, exclude: set[str] | None = None) -> None:
        if req.route not in ("auto", "collocated", "disaggregated"):
            self.out.send(self.gateway_address, Error(
                rid=req.rid, code=400,
                message=f"route {req.route!r}; allowed: auto, collocated, disaggregated"))
            return
        n = int(req.sampling.get("n", 1) or 1)
        d = self.policy.decide(len(req.token_ids), n, req.route, self.live_workers(), exclude)
        if isinstance(d, str):
            self.requests.pop(req.rid, None)
            self.out.send(self.gateway_address, Error(
                rid=req.rid, code=503, message=f"cannot route request: {d}"))
            return
        now = time.monotonic()
        old = self.requests.get(req.rid)
        t = Tracked(req, d, "running", old.deadline if old else now + self.cfg.request_timeout_s,
                    tried_decodes=exclude or set())
        self.requests[req.rid] = t
        if d.route == "collocated":
            self.start_leg(t, d.worker, Run(rid=req.rid, token_ids=req.token_ids,
                                            sampling=req.sampling))
        else:
            t.stage, t.stage_deadline = "reserving", now + RESERVE_TIMEOUT_S
            self.start_leg(t, d.decode, Reserve(rid=req.rid, num_tokens=len(req.token_ids),
                                                lease_s=self.cfg.kv_lease_s))

    def start_leg(self, t: Tracked, name: str, msg: Message) -> None:
        t.legs.add(name)
        self.workers[name].inflight += 1
        self.send_worker(name, msg)

    def on_reserved(self, msg: Reserved) -> None:
        t = self.requests.get(msg.rid)
        if t is None or t.stage != "reserving":
            if msg.ok:  # late answer for a request that moved on: free it
                self.send_worker(msg.worker, AbortRequest(rid=msg.rid))
            return
        if not msg.ok:
            self.retry_reserve(t, f"{msg.worker}: {msg.reason}")
            return
        d = t.decision
        t.stage = "prefill"
        self.start_leg(t, d.prefill, Run(
            rid=t.req.rid, token_ids=t.req.token_ids, sampling=t.req.sampling, dest=d.decode,
            dest_address=self.workers[d.decode].beat.address, dest_block_ids=msg.block_ids,
            transport=d.transport))

    def retry_reserve(self, t: Tracked, why: str) -> None:
        log.info("reservation for %s refused (%s); choosing again", t.req.rid, why)
        self.end_legs(t)
        self.on_route(t.req, exclude=t.tried_decodes | {t.decision.decode})

    def on_done(self, msg: RequestDone) -> None:
        t = self.requests.get(msg.rid)
        if t is None:
            return
        if msg.error:
            self.fail(msg.rid, f"{msg.worker}: {msg.error}", 500)
            return
        self.requests.pop(msg.rid)
        self.end_legs(t, except_worker=msg.worker)
        self.paths[t.decision.route] += 1

    # ---- loop
    def check_timeouts(self) -> None:
        now = time.monotonic()
        live = {w.name for w in self.live_workers()}
        for rid, t in list(self.requests.items()):
            dead = [w for w in t.legs if w not in live]
            if dead:
                self.fail(rid, f"worker {dead[0]} stopped responding", 503)
            elif now > t.deadline:
                self.fail(rid, f"no result within {self.cfg.request_timeout_s:.0f} s", 504)
            elif t.stage == "reserving" and now > t.stage_deadline:
                self.retry_reserve(t, "no answer to Reserve")

    def write_status(self) -> None:
        workers = sorted(w.name for w in self.live_workers())
        write_status(self.cfg.run_path, "router", role="router", device="-",
                     strategy=self.cfg.strategy, workers=workers,
                     in_flight=len(self.requests), paths=dict(self.paths))

    def run(self) -> None:
        self.write_status()
        log.info("router (%s) ready at %s", self.cfg.strategy, self.cfg.router_inbox)
        next_check = 0.0
        while not self.stopping:
            self.inbox.wait(int(self.cfg.heartbeat_s * 1000))
            self._live = None
            for msg in self.inbox.drain():
                self.handle_guarded(msg)
            if time.monotonic() >= next_check:
                next_check = time.monotonic() + self.cfg.heartbeat_s
                self.check_timeouts()
                self.write_status()
            self.out.flush()
        clear_status(self.cfg.run_path, "router")
        self.out.close()
        self.inbox.close()
        self.ctx.term()


def run_router(cfg: MeshConfig) -> None:
    router = Router(cfg)
    gc.freeze()  # what startup made lives on: keep it out of every gc pass

    def stop(signum: int, frame: object) -> None:
        router.stopping = True

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    router.run()
