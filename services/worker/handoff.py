"""The worker's side of the KV hand-off (ARCHITECTURE.md, disaggregated lifecycle).

Decode side: `Reserve` -> blocks held under a lease -> `KvReady` -> transport copies the KV
in -> the sequence joins the batch -> `KvAck` to the prefill worker.
Prefill side: first token sampled -> transport `send` (retried while the channel is full)
-> `KvReady` to the decode worker -> blocks held until `KvAck` or lease expiry.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING

from common.protocol import KvAck, KvReady, Reserve, Reserved, Run, Tokens
from common.transport import make_transport, transports_for
from services.worker.engine.sampling_params import SamplingParams
from services.worker.engine.sequence import Sequence

if TYPE_CHECKING:
    from services.worker.main import Worker

log = logging.getLogger("nanopd.worker")


@dataclass
class Leg:
    """What a worker knows about one request it serves."""

    rid: str
    kind: str  # collocated | prefill | decode
    run: Run | None = None
    num_finished: int = 0
    num_output_tokens: int = 0


@dataclass
class Held:
    seq: Sequence
    deadline: float
    transport: str
    handle: dict | None = None  # None: not shipped yet (channel full)


class Handoff:
    def __init__(self, worker: Worker, lease_s: float):
        self.w = worker
        self.lease_s = lease_s
        pool = worker.engine.runner.kv_pool
        self.transports = {n: make_transport(n, pool, worker=worker.name)
                           for n in transports_for(pool.device)}
        self.reserved: dict[str, tuple[float, list[int]]] = {}  # rid -> (deadline, blocks)
        self.held: dict[str, Held] = {}

    def transport_names(self) -> list[str]:
        return list(self.transports)

    @property
    def busy(self) -> bool:
        return any(h.handle is None for h in self.held.values())

    # ---- decode side
    def on_reserve(self, msg: Reserve) -> None:
        blocks = self.w.engine.reserve(msg.rid, msg.num_tokens)
        ok = blocks is not None
        if ok:
            self.reserved[msg.rid] = (time.monotonic() + msg.lease_s, blocks)
        self.w.to_router(Reserved(rid=msg.rid, worker=self.w.name, ok=ok,
                                  block_ids=blocks or [],
                                  reason="" if ok else "not enough free KV blocks"))

    def on_kv_ready(self, msg: KvReady) -> None:
        entry = self.reserved.pop(msg.rid, None)
        ack = lambda ok, reason="": self.w.out.send(  # noqa: E731
            msg.src_address, KvAck(rid=msg.rid, ok=ok, reason=reason))
        if entry is None:
            ack(False, "no reservation (expired or aborted)")
            return
        transport = self.transports.get(msg.transport)
        if transport is None:
            self.w.engine.abort(msg.rid)
            ack(False, f"transport {msg.transport!r} not available here")
            self.w.fail(msg.rid, f"decode worker has no transport {msg.transport!r}")
            return
        try:
            params = SamplingParams.from_dict(msg.sampling)
            transport.recv(msg.handle.get("export", {}), msg.handle, entry[1])
            self.w.engine.add_prefilled(msg.rid, msg.token_ids, msg.num_prompt_tokens, params)
        except Exception as e:  # a broken hand-off fails the request, never the worker
            self.w.engine.abort(msg.rid)
            ack(False, f"hand-off failed: {e}")
            self.w.fail(msg.rid, f"KV hand-off failed: {e}")
            return
        ack(True)
        # the first token was sampled by the prefill worker; it is streamed from here
        self.w.legs[msg.rid] = Leg(msg.rid, "decode", num_output_tokens=1)
        self.w.to_gateway(Tokens(rid=msg.rid, index=0, token_ids=[msg.token_ids[-1]],
                                 worker=self.w.name))

    # ---- prefill side
    def ship(self, prefilled: list[Sequence]) -> None:
        now = time.monotonic()
        for seq in prefilled:
            leg = self.w.legs.get(seq.rid)
            if leg is None or leg.run is None:
                self.w.engine.release(seq.rid)
                continue
            self.held[seq.rid] = Held(seq, now + self.lease_s, leg.run.transport)
        for rid, held in list(self.held.items()):
            if held.handle is None:
                self._try_send(rid, held)

    def _try_send(self, rid: str, held: Held) -> None:
        run = self.w.legs[rid].run
        transport = self.transports.get(held.transport)
        if transport is None:
            self.w.fail(rid, f"prefill worker has no transport {held.transport!r}")
            return
        seq = held.seq
        num_blocks = -(-seq.num_prompt_tokens // self.w.engine.config.block_size)
        handle = transport.send(rid, seq.block_table[:num_blocks])
        if handle is None:
            return  # channel full: try again next loop, until the lease runs out
        handle["export"] = transport.export()
        held.handle = handle
        self.w.out.send(run.dest_address, KvReady(
            rid=rid, src=self.w.name, src_address=self.w.address, token_ids=seq.token_ids,
            sampling=run.sampling, num_prompt_tokens=seq.num_prompt_tokens,
            transport=held.transport, handle=handle,
        ))

    def on_ack(self, msg: KvAck) -> None:
        held = self.held.pop(msg.rid, None)
        if held is None:
            return
        self._release(held)
        self.w.legs.pop(msg.rid, None)
        if not msg.ok:
            self.w.fail(msg.rid, f"decode worker refused the KV: {msg.reason}")

    # ---- both
    def _release(self, held: Held) -> None:
        if held.handle is not None:
            self.transports[held.transport].release(held.handle)
        self.w.engine.release(held.seq.rid)

    def forget(self, rid: str) -> None:
        """Abort or failure: free whatever this request holds here."""
        held = self.held.pop(rid, None)
        if held is not None:
            self._release(held)
        self.reserved.pop(rid, None)  # engine.abort frees the reserved blocks

    def expire(self) -> None:
        now = time.monotonic()
        for rid in [r for r, (deadline, _) in self.reserved.items() if deadline < now]:
            self.reserved.pop(rid)
            self.w.engine.abort(rid)
            log.warning("reservation for %s expired: no KV arrived", rid)
        for rid in [r for r, h in self.held.items() if h.deadline < now]:
            self.w.fail(rid, "KV hand-off lease expired: no ack from the decode worker")

    def close(self) -> None:
        for t in self.transports.values():
            t.close()
