"""The worker's side of the KV hand-off (ARCHITECTURE.md, disaggregated lifecycle).

Prefill side: after every step, the blocks that a prefill-only request has completed since
its last chunk go to the transport (`send`: on a GPU the copies are queued on a side stream
and the next prompt chunk computes meanwhile); once the transport says they are ready
(`poll`) a `KvChunk` tells the decode worker. When the first token is sampled, the rest of
the prompt's blocks go the same way in `KvReady`, waited for at once (the first token waits
on it); every block stays held until `KvAck` or lease expiry. A prompt that fits in one
step ships in KvReady alone.
Decode side: `Reserve` -> blocks held under a lease -> each `KvChunk` is copied in as it
arrives (renewing the lease) -> `KvReady`: the last copy, then every copy waited for, then
the sequence joins the batch -> `KvAck` to the prefill worker. A refusal or failure at any
point frees the blocks on both sides.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from common.protocol import KvAck, KvChunk, KvReady, Message, Reserve, Reserved, Run, Tokens
from common.transport import KvTransport, TransportError, make_transport, transports_for
from services.worker.engine.sampling_params import SamplingParams
from services.worker.engine.sequence import Sequence
from services.worker.ops import cuda_ops

if TYPE_CHECKING:
    from services.worker.main import Worker

log = logging.getLogger("nanopd.worker")

COPY_TIMEOUT_S = 5.0  # a wait for copies already under way (not for another process)


@dataclass
class Leg:
    """What a worker knows about one request it serves."""

    rid: str
    kind: str  # collocated | prefill | decode
    run: Run | None = None
    num_finished: int = 0
    num_output_tokens: int = 0


@dataclass
class Outgoing:
    """Prefill side: one request's KV on its way to the decode worker."""

    run: Run
    shipped: list[int] = field(default_factory=list)  # source blocks sent, in prompt order
    handles: list[dict] = field(default_factory=list)  # every send, released at the end
    queue: list[tuple[dict, Message]] = field(default_factory=list)  # waiting for `poll`
    num_chunks: int = 0  # KvChunk messages made
    seq: Sequence | None = None  # set once the first token is sampled
    final_made: bool = False  # the KvReady is queued (or sent)
    deadline: float = math.inf  # for the KvAck, from the first token on


@dataclass
class Reservation:
    """Decode side: blocks waiting for one request's KV."""

    block_ids: list[int]
    lease_s: float
    deadline: float
    num_chunks: int = 0  # KvChunk messages taken
    num_blocks_in: int = 0  # blocks [0, num_blocks_in) arrived or are being copied
    transports: set[str] = field(default_factory=set)  # copies may still run on these


class HandoffError(ValueError):
    """A hand-off message that does not fit this worker's state; the text says why."""


def transport_kw(name: str) -> dict:
    """cuda_ipc pulls KV with csrc's copy_blocks kernel (one launch) when it is built."""
    if name == "cuda_ipc" and cuda_ops.load() is not None:
        return {"copy_blocks": cuda_ops.copy_blocks}
    return {}


class Handoff:
    def __init__(self, worker: Worker, lease_s: float):
        self.w = worker
        self.lease_s = lease_s
        pool = worker.engine.runner.kv_pool
        self.transports = {n: make_transport(n, pool, worker=worker.name, **transport_kw(n))
                           for n in transports_for(pool.device)}
        self.reserved: dict[str, Reservation] = {}
        self.outgoing: dict[str, Outgoing] = {}
        self.counts = {"num_kv_chunks_sent": 0, "num_kv_chunks_received": 0}  # for status

    def transport_names(self) -> list[str]:
        return list(self.transports)

    @property
    def busy(self) -> bool:
        """KV waits to be sent or announced (the loop must come back soon)."""
        return any(o.queue or (o.seq is not None and not o.final_made)
                   for o in self.outgoing.values())

    def _transport(self, name: str) -> KvTransport:
        transport = self.transports.get(name)
        if transport is None:
            raise HandoffError(f"transport {name!r} not available here; this worker has "
                               f"{self.transport_names()}")
        return transport

    # ---- decode side
    def on_reserve(self, msg: Reserve) -> None:
        blocks = self.w.engine.reserve(msg.rid, msg.num_tokens)
        ok = blocks is not None
        if ok:
            self.reserved[msg.rid] = Reservation(blocks, msg.lease_s,
                                                 time.monotonic() + msg.lease_s)
        self.w.to_router(Reserved(rid=msg.rid, worker=self.w.name, ok=ok,
                                  block_ids=blocks or [],
                                  reason="" if ok else "not enough free KV blocks"))

    def on_kv_chunk(self, msg: KvChunk) -> None:
        r = self.reserved.get(msg.rid)
        if r is None:
            self._ack(msg.src_address, msg.rid, False, "no reservation (expired or aborted)")
            return
        end = msg.block_offset + msg.num_blocks
        try:
            transport = self._transport(msg.transport)
            if msg.index != r.num_chunks:
                raise HandoffError(f"KV chunk {msg.index} arrived; chunk {r.num_chunks} "
                                   "was due (a chunk was lost)")
            if not 0 <= msg.block_offset <= r.num_blocks_in or end > len(r.block_ids):
                raise HandoffError(
                    f"KV chunk {msg.index} covers blocks [{msg.block_offset}, {end}); "
                    f"{r.num_blocks_in} of {len(r.block_ids)} reserved blocks came before")
            r.transports.add(msg.transport)
            transport.recv(msg.handle.get("export", {}), msg.handle,
                           r.block_ids[msg.block_offset:end], wait=False,
                           timeout_s=COPY_TIMEOUT_S)
        except Exception as e:  # a broken hand-off fails the request, never the worker
            self._refuse(msg.rid, msg.src_address, f"hand-off failed: {e}")
            return
        r.num_chunks += 1
        self.counts["num_kv_chunks_received"] += 1
        r.num_blocks_in = max(r.num_blocks_in, end)
        r.deadline = time.monotonic() + r.lease_s  # the peer is alive: renew the lease

    def on_kv_ready(self, msg: KvReady) -> None:
        r = self.reserved.get(msg.rid)
        if r is None:
            self._ack(msg.src_address, msg.rid, False, "no reservation (expired or aborted)")
            return
        try:
            transport = self._transport(msg.transport)
            params = SamplingParams.from_dict(msg.sampling)
            if msg.num_chunks != r.num_chunks:
                raise HandoffError(f"KvReady follows {msg.num_chunks} KV chunks; "
                                   f"{r.num_chunks} arrived")
            if not 0 <= msg.block_offset <= r.num_blocks_in:
                raise HandoffError(f"KvReady starts at block {msg.block_offset}; "
                                   f"{r.num_blocks_in} blocks came before")
            r.transports.add(msg.transport)
            transport.recv(msg.handle.get("export", {}), msg.handle,
                           r.block_ids[msg.block_offset:], wait=False, timeout_s=COPY_TIMEOUT_S)
            self._settle(r, strict=True)
            del self.reserved[msg.rid]
            self.w.engine.add_prefilled(msg.rid, msg.token_ids, msg.num_prompt_tokens, params)
        except Exception as e:  # a broken hand-off fails the request, never the worker
            self._refuse(msg.rid, msg.src_address, f"hand-off failed: {e}")
            return
        self._ack(msg.src_address, msg.rid, ok=True)
        # the first token was sampled by the prefill worker; it is streamed from here
        self.w.legs[msg.rid] = Leg(msg.rid, "decode", num_output_tokens=1)
        self.w.to_gateway(Tokens(rid=msg.rid, index=0, token_ids=[msg.token_ids[-1]],
                                 worker=self.w.name))

    def _ack(self, address: str, rid: str, ok: bool, reason: str = "") -> None:
        self.w.out.send(address, KvAck(rid=rid, ok=ok, reason=reason))

    def _refuse(self, rid: str, address: str, reason: str) -> None:
        """Tell the prefill side to free its blocks; fail the request here (frees ours)."""
        self._ack(address, rid, False, reason)
        self.w.fail(rid, f"KV {reason}")

    def _settle(self, r: Reservation, strict: bool = False) -> None:
        """Wait for the copies into `r`'s blocks (before they are used, acked or freed)."""
        for name in sorted(r.transports):
            try:
                self.transports[name].wait_received(COPY_TIMEOUT_S)
            except TransportError:
                if strict:
                    raise
                log.exception("copies into freed KV blocks may still run")
        r.transports.clear()

    # ---- prefill side
    def ship(self, prefilled: list[Sequence]) -> None:
        """Once per loop: chunks of prompts still computing, then the prompts that finished
        (`prefilled`: their first token is sampled), then announce whatever is ready."""
        now = time.monotonic()
        for seq in prefilled:
            leg = self.w.legs.get(seq.rid)
            if leg is None or leg.run is None:
                self.w.engine.release(seq.rid)
                continue
            out = self.outgoing.setdefault(seq.rid, Outgoing(leg.run))
            out.seq, out.deadline = seq, now + self.lease_s
        failed: list[tuple[str, str]] = []
        for rid, leg in self.w.legs.items():
            if leg.kind == "prefill" and leg.run is not None:
                try:
                    self._advance(rid, leg.run)
                except Exception as e:  # fails the request, never the worker
                    failed.append((rid, str(e)))
        for rid, error in failed:
            self.w.fail(rid, f"KV hand-off failed: {error}")

    def _advance(self, rid: str, run: Run) -> None:
        out = self.outgoing.get(rid)
        if out is None or out.seq is None:  # still computing: ship the blocks done so far
            blocks = self.w.engine.computed_blocks(rid)
            if out is None and not blocks:
                return
            out = out or self.outgoing.setdefault(rid, Outgoing(run))
            self._send(rid, out, blocks, final=False)
        elif not out.final_made:
            bs = self.w.engine.config.block_size
            num_blocks = -(-out.seq.num_prompt_tokens // bs)
            out.final_made = self._send(rid, out, out.seq.block_table[:num_blocks], final=True)
            if out.final_made:  # the first token waits on it: not until the next loop turn
                self._transport(out.run.transport).wait_sent(out.queue[-1][0], COPY_TIMEOUT_S)
        transport = self._transport(out.run.transport)
        while out.queue and transport.poll(out.queue[0][0]):
            self.w.out.send(out.run.dest_address, out.queue.pop(0)[1])

    def _send(self, rid: str, out: Outgoing, blocks: list[int], final: bool) -> bool:
        """Send `blocks[len(shipped):]`; False if the channel is full (try again later)."""
        if blocks[:len(out.shipped)] != out.shipped:  # preempted and recomputed: start over
            out.shipped = []
        new = blocks[len(out.shipped):]
        if not new and not final:
            return False
        transport = self._transport(out.run.transport)
        handle = transport.send(f"{rid}#{len(out.handles)}", new)
        if handle is None:
            return False  # channel full: try again next loop, until the lease runs out
        handle["export"] = transport.export()
        out.handles.append(handle)
        offset = len(out.shipped)
        out.shipped += new
        if final:
            seq = out.seq
            assert seq is not None
            msg: Message = KvReady(
                rid=rid, src=self.w.name, src_address=self.w.address, token_ids=seq.token_ids,
                sampling=out.run.sampling, num_prompt_tokens=seq.num_prompt_tokens,
                transport=out.run.transport, handle=handle, block_offset=offset,
                num_chunks=out.num_chunks)
        else:
            msg = KvChunk(rid=rid, src_address=self.w.address, index=out.num_chunks,
                          block_offset=offset, num_blocks=len(new),
                          transport=out.run.transport, handle=handle)
            out.num_chunks += 1
            self.counts["num_kv_chunks_sent"] += 1
        out.queue.append((handle, msg))
        return True

    def on_ack(self, msg: KvAck) -> None:
        out = self.outgoing.pop(msg.rid, None)
        if out is None:
            return
        self._release(msg.rid, out)
        self.w.legs.pop(msg.rid, None)
        if not msg.ok:
            self.w.fail(msg.rid, f"decode worker refused the KV: {msg.reason}")

    # ---- both
    def _release(self, rid: str, out: Outgoing) -> None:
        transport = self.transports.get(out.run.transport)
        for handle in out.handles if transport is not None else []:
            transport.release(handle)
        self.w.engine.release(rid)

    def forget(self, rid: str) -> None:
        """Abort or failure: free whatever this request holds here."""
        out = self.outgoing.pop(rid, None)
        if out is not None:
            self._release(rid, out)
        r = self.reserved.pop(rid, None)  # engine.abort frees the reserved blocks
        if r is not None:
            self._settle(r)

    def expire(self) -> None:
        now = time.monotonic()
        for rid in [r for r, res in self.reserved.items() if res.deadline < now]:
            self._settle(self.reserved.pop(rid))
            self.w.engine.abort(rid)
            log.warning("reservation for %s expired: no KV arrived", rid)
        for rid in [r for r, o in self.outgoing.items() if o.deadline < now]:
            self.w.fail(rid, "KV hand-off lease expired: no ack from the decode worker")

    def close(self) -> None:
        for t in self.transports.values():
            t.close()
