"""The worker service: one engine on one device; its role is configuration, not code.

Loop: drain the inbox -> one engine step if there is work -> queue tokens / ship KV ->
expire leases -> heartbeat -> flush (one batch per peer). It blocks on the inbox only when
nothing is runnable.

A leg that ends well tells the router (`RequestDone`) up to `DONE_HOLD_S` later, with the
others that ended meanwhile: the client's last tokens go to the gateway at once, and the
router is not woken while the gateway and the client are working on them (on a 2-core
machine, one request in flight: p50 -40 us, bench/results/README.md). A failed leg tells it
at once.
"""

from __future__ import annotations

import gc
import logging
import math
import os
import signal
import time

import torch
import zmq

from common.config import MeshConfig
from common.health import clear_status, write_status
from common.protocol import (
    AbortRequest,
    Heartbeat,
    KvAck,
    KvChunk,
    KvReady,
    Message,
    RequestDone,
    Reserve,
    Run,
    Tokens,
)
from common.sockets import Inbox, Outboxes
from services.launcher_config import available_cores, worker_threads
from services.worker.engine.config import EngineConfig
from services.worker.engine.engine import LLMEngine, RequestError, TokenEvent
from services.worker.engine.sampling_params import SamplingParams, SamplingParamsError
from services.worker.handoff import Handoff, Leg
from services.worker.keepalive import KeepAlive
from services.worker.null_engine import NullEngine

log = logging.getLogger("nanopd.worker")

DONE_HOLD_S = 0.002  # longest a finished leg's RequestDone waits to share a batch


class Worker:
    def __init__(self, cfg: MeshConfig, name: str):
        self.cfg, self.name = cfg, name
        self.wcfg = cfg.worker(name)
        # NANOPD_THREADS (set by `nanopd up`), else the config's share of the cores, so that
        # workers started any other way (systemd) don't oversubscribe the CPU either
        threads = int(os.environ.get("NANOPD_THREADS", "0") or 0)
        torch.set_num_threads(threads or worker_threads(cfg, available_cores())[name])
        if cfg.model == "null":  # control-plane measurements: no model, fixed tokens
            self.engine = NullEngine()
        else:
            self.engine = LLMEngine(EngineConfig(model=cfg.model or None,
                                                 device=self.wcfg.device, **self.wcfg.engine))
        self.ctx = zmq.Context()
        self.address = cfg.worker_inbox(name)
        self.router_address, self.gateway_address = cfg.router_inbox, cfg.gateway_inbox
        self.inbox = Inbox(self.ctx, self.address)
        self.out = Outboxes(self.ctx)
        self.handoff = Handoff(self, cfg.kv_lease_s)
        self.legs: dict[str, Leg] = {}
        self.held_done: list[RequestDone] = []  # finished legs' RequestDone, until done_due
        self.done_due = 0.0
        self.stopping = False
        self.next_heartbeat = 0.0
        self.keepalive = KeepAlive(self.ctx, self.router_address, cfg.heartbeat_s,
                                   stale_after_s=max(60.0, 20 * cfg.heartbeat_s))

    # ---- outgoing
    def to_router(self, msg: Message) -> None:
        self.out.send(self.router_address, msg)

    def to_gateway(self, msg: Message) -> None:
        self.out.send(self.gateway_address, msg)

    def fail(self, rid: str, error: str) -> None:
        """A leg failed: tell the router (it tells the gateway and the other leg)."""
        log.warning("request %s failed: %s", rid, error)
        self.engine.abort(rid)
        self.handoff.forget(rid)
        self.legs.pop(rid, None)
        self.to_router(RequestDone(rid=rid, worker=self.name, error=error))

    # ---- incoming
    def handle(self, msg: Message) -> None:
        try:
            if isinstance(msg, Run):
                self.on_run(msg)
            elif isinstance(msg, Reserve):
                self.handoff.on_reserve(msg)
            elif isinstance(msg, KvChunk):
                self.handoff.on_kv_chunk(msg)
            elif isinstance(msg, KvReady):
                self.handoff.on_kv_ready(msg)
            elif isinstance(msg, KvAck):
                self.handoff.on_ack(msg)
            elif isinstance(msg, AbortRequest):
                self.engine.abort(msg.rid)
                self.handoff.forget(msg.rid)
                self.legs.pop(msg.rid, None)
            else:
                log.warning("unexpected %s on a worker inbox; dropped", type(msg).__name__)
        except (RequestError, SamplingParamsError, ValueError) as e:
            self.fail(getattr(msg, "rid", ""), str(e))
        except Exception as e:  # a bug: that request fails, the worker goes on serving
            log.exception("handling a %s failed", type(msg).__name__)
            rid = getattr(msg, "rid", "")
            if rid:
                self.fail(rid, f"internal error in worker {self.name}: {type(e).__name__}: {e}")

    def on_run(self, msg: Run) -> None:
        params = SamplingParams.from_dict(msg.sampling)
        if msg.rid in self.legs:
            raise RequestError(f"request id {msg.rid!r} is already running here")
        kind = "prefill" if msg.dest else "collocated"
        self.engine.add_request(msg.rid, msg.token_ids, params, prefill_only=bool(msg.dest))
        self.legs[msg.rid] = Leg(msg.rid, kind, run=msg)

    # ---- tokens out
    def emit(self, events: list[TokenEvent]) -> None:
        for ev in events:
            leg = self.legs.get(ev.rid)
            if leg is None:
                continue
            if leg.kind == "prefill" and ev.finish_reason is None:
                continue  # the decode worker streams the first token with the rest
            self.to_gateway(Tokens(
                rid=ev.rid, index=ev.index, token_ids=[ev.token_id],
                finish_reason=ev.finish_reason,
                logprobs=[ev.logprob] if ev.logprob is not None else None, worker=self.name,
            ))
            leg.num_output_tokens += 1
            if ev.finish_reason is not None:
                leg.num_finished += 1
                n = leg.run.sampling.get("n", 1) if leg.run else 1
                if leg.num_finished >= n:
                    self.finish(leg, ev.finish_reason)

    def finish(self, leg: Leg, reason: str) -> None:
        self.legs.pop(leg.rid, None)
        self.engine.seqs.pop(leg.rid, None)
        self.handoff.forget(leg.rid)
        if not self.held_done:
            self.done_due = time.monotonic() + DONE_HOLD_S
        self.held_done.append(RequestDone(rid=leg.rid, worker=self.name, finish_reason=reason,
                                          num_output_tokens=leg.num_output_tokens))

    def release_done(self, force: bool = False) -> None:
        """Queue the held RequestDones for the router once they are due (`force`: now)."""
        if self.held_done and (force or time.monotonic() >= self.done_due):
            for msg in self.held_done:
                self.to_router(msg)
            self.held_done.clear()

    # ---- loop
    def heartbeat(self) -> None:
        now = time.monotonic()
        if now < self.next_heartbeat:
            return
        self.next_heartbeat = now + self.cfg.heartbeat_s
        st = self.engine.stats()
        beat = Heartbeat(
            worker=self.name, role=self.wcfg.role, device=self.wcfg.device,
            address=self.address, pid=os.getpid(), num_running=st["num_running"],
            num_waiting=st["num_waiting"], num_free_blocks=st["num_free_blocks"],
            num_blocks=st["num_blocks"], block_size=self.engine.config.block_size,
            transports=self.handoff.transport_names(),
        )
        self.to_router(beat)
        self.keepalive.note(beat)  # re-sent by its thread while a long step runs
        write_status(self.cfg.run_path, self.name, role=self.wcfg.role,
                     device=self.wcfg.device, **{k: st[k] for k in (
                         "num_running", "num_waiting", "num_free_blocks", "num_blocks",
                         "peak_batch_seqs")}, **self.handoff.counts)

    def run(self) -> None:
        self.heartbeat()
        self.out.flush()
        self.keepalive.start()
        log.info("worker %s (%s on %s) ready at %s", self.name, self.wcfg.role,
                 self.wcfg.device, self.address)
        while not self.stopping:
            busy = self.engine.has_unfinished() or self.handoff.busy
            timeout_ms = 0 if busy else int(self.cfg.heartbeat_s * 1000)
            if self.held_done and timeout_ms:
                timeout_ms = min(timeout_ms, max(0, math.ceil(
                    (self.done_due - time.monotonic()) * 1000)))
            self.inbox.wait(timeout_ms)
            for msg in self.inbox.drain():
                self.handle(msg)
            if self.engine.has_unfinished():
                self.emit(self.engine.step())
            self.handoff.ship(self.engine.take_prefilled())
            self.handoff.expire()
            self.heartbeat()
            self.release_done()
            self.out.flush()
        self.close()

    def close(self) -> None:
        self.keepalive.stop()
        self.release_done(force=True)
        clear_status(self.cfg.run_path, self.name)
        self.handoff.close()
        self.out.close()
        self.inbox.close()
        self.ctx.term()


def run_worker(cfg: MeshConfig, name: str) -> None:
    worker = Worker(cfg, name)
    gc.freeze()  # the model and the imports live on: keep them out of every gc pass

    def stop(signum: int, frame: object) -> None:
        worker.stopping = True

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    worker.run()
