"""shm_ring: KV blocks through a POSIX shared-memory ring of fixed-size slots (one host).

The prefill worker owns the ring, a shared memory segment `/dev/shm/nanopd_<worker>_<pid>_
<random>`: a header of one int64 stamp per slot, then `num_slots` slots of one KV block each
(all layers, K and V: `[num_layers, 2, block_size, num_kv_heads, head_dim]`, the pool's
dtype). `send` takes free slots (a free list on the prefill side; none if the ring is full),
starts copying the blocks into them and names them in the handle with a fresh transfer
token; each slot's stamp becomes that token once its data is in place. The decode worker
maps the ring once per peer, waits piece by piece (`piece_slots` slots) for the stamps and
copies each piece into its blocks as soon as it is there; `release` (on KvAck or lease
expiry) frees the slots.

Works for any pair of devices: the copies go device -> ring -> device. With a GPU pool the
mapping is registered as pinned memory in that process, so the copies run at DMA speed;
`send` queues one gather and one device-to-host copy per piece on a side stream, each piece
followed by an event, and returns; `poll` stamps the pieces whose event has completed. While
the producer polls, the consumer's host-to-device copy of piece i overlaps the producer's
copy of piece i + 1. With a CPU pool `send` copies and stamps before it returns.

A stamp is written by the producer's CPU after its data is complete (the event completed or
the CPU copy returned) and read by the consumer's CPU before it copies: the store order of
x86-64 keeps data before stamp.
The segment itself (layout, pinning, attaching without the resource tracker) is
`shm_segment.py`.
"""

from __future__ import annotations

import itertools

import torch

from common.transport.base import (
    DEFAULT_TIMEOUT_S,
    KvTransport,
    TransportError,
    as_words,
    block_runs,
    dtype_name,
    wait_stream,
    wait_until,
)
from common.transport.shm_segment import RingMapping, attach_ring, create_ring

DEFAULT_RING_NBYTES = 256 * 2**20
DEFAULT_PIECE_NBYTES = 4 * 2**20  # a consumer starts on a piece once the producer is done with it
_HANDLE_FIELDS = ("ring", "rid", "slots", "num_slots", "slot_shape", "dtype", "token",
                  "piece_slots")


def slot_runs(slots: list[int]) -> list[tuple[int, int, int]]:
    """`(first_slot, count, offset_in_slots)` for each stretch of consecutive slot ids."""
    runs: list[tuple[int, int, int]] = []
    for i, s in enumerate(slots):
        if runs and s == runs[-1][0] + runs[-1][1]:
            first, count, offset = runs[-1]
            runs[-1] = (first, count + 1, offset)
        else:
            runs.append((s, 1, i))
    return runs


class ShmRingTransport(KvTransport):
    name = "shm_ring"
    recv_waits_for_send = True  # the stamps

    def __init__(self, kv_pool: torch.Tensor, worker: str = "worker",
                 num_slots: int | None = None, ring_nbytes: int = DEFAULT_RING_NBYTES,
                 piece_nbytes: int = DEFAULT_PIECE_NBYTES) -> None:
        super().__init__(kv_pool, worker)
        self.num_slots = num_slots if num_slots is not None else ring_nbytes // self.block_nbytes
        if self.num_slots < 1:
            raise TransportError(
                f"shm ring of {self.num_slots} slots; one KV block is {self.block_nbytes} "
                f"bytes and ring_nbytes is {ring_nbytes}: raise ring_nbytes or num_slots"
            )
        self.piece_slots = max(1, piece_nbytes // self.block_nbytes)
        self._own: RingMapping | None = None  # prefill side: created on first export/send
        self._free: list[int] = []  # sorted free slot ids
        self._leases: dict[str, list[int]] = {}  # rid -> its slots, until released
        self._tokens = itertools.count(1)  # 0: a slot no transfer has filled
        self._unstamped: dict[int, list[tuple[torch.cuda.Event, torch.Tensor]]] = {}
        self._peers: dict[str, RingMapping] = {}  # decode side: ring name -> mapping
        self._stream = torch.cuda.Stream(self.device) if self.device.type == "cuda" else None
        self._closed = False

    @property
    def num_free_slots(self) -> int:
        self._ensure_ring()
        return len(self._free)

    # prefill side
    def export(self) -> dict:
        own = self._ensure_ring()
        return {"transport": self.name, "ring": own.name, "num_slots": self.num_slots,
                "slot_shape": self.block_shape, "dtype": dtype_name(self.kv_pool.dtype)}

    def send(self, rid: str, src_block_ids: list[int]) -> dict | None:
        self.check_block_ids(src_block_ids, "src_block_ids")
        own = self._ensure_ring()
        if rid in self._leases:
            raise TransportError(f"request {rid!r} already holds ring slots; release them first")
        slots = self._alloc(len(src_block_ids))
        if slots is None:
            return None
        token = next(self._tokens)
        try:
            if slots:
                self._copy_to_ring(own, src_block_ids, slots, token)
        except BaseException:
            self._free = sorted(self._free + slots)
            raise
        self._leases[rid] = slots
        return {**self.export(), "rid": rid, "slots": slots, "token": token,
                "piece_slots": self.piece_slots}

    def poll(self, handle: dict) -> bool:
        token = handle.get("token")
        pieces = self._unstamped.get(token)
        if pieces is None:
            return True
        assert self._own is not None and self._own.stamps is not None
        while pieces and pieces[0][0].query():
            self._own.stamps[pieces.pop(0)[1]] = token
        if pieces:
            return False
        del self._unstamped[token]
        return True

    def release(self, handle: dict) -> None:
        self.check_handle(handle, _HANDLE_FIELDS)
        own_name = self._own.name if self._own is not None else None
        if handle["ring"] != own_name:
            raise TransportError(
                f"handle is for ring {handle['ring']!r}; this worker's ring is {own_name!r}"
            )
        if self._leases.get(handle["rid"]) == handle["slots"]:
            self._free = sorted(self._free + self._leases.pop(handle["rid"]))
            self._unstamped.pop(handle["token"], None)
        # else: released already (KvAck after lease expiry); nothing to do

    # decode side
    def recv(self, peer_export: dict, handle: dict, dst_block_ids: list[int], *,
             wait: bool = True, timeout_s: float = DEFAULT_TIMEOUT_S) -> None:
        self.check_handle(handle, _HANDLE_FIELDS)
        if peer_export and peer_export.get("ring", handle["ring"]) != handle["ring"]:
            raise TransportError(
                f"handle names ring {handle['ring']!r} but the peer exported ring "
                f"{peer_export['ring']!r}: the handle comes from another worker"
            )
        self.check_layout(handle["slot_shape"], handle["dtype"], f"ring {handle['ring']!r}")
        slots = handle["slots"]
        if len(slots) != len(dst_block_ids):
            raise TransportError(
                f"handle has {len(slots)} slots for {len(dst_block_ids)} destination blocks"
            )
        self.check_block_ids(slots, f"ring {handle['ring']!r} slots", handle["num_slots"])
        self.check_block_ids(dst_block_ids, "dst_block_ids", unique=True)
        piece = handle["piece_slots"]
        if isinstance(piece, bool) or not isinstance(piece, int) or piece < 1:
            raise TransportError(f"handle has piece_slots {piece!r}; expected an int >= 1")
        if slots:
            mapping = self._attach(handle["ring"], handle["num_slots"])
            self._copy_from_ring(mapping, handle, dst_block_ids, timeout_s)
            if wait:
                self.wait_received(timeout_s)

    def wait_received(self, timeout_s: float = DEFAULT_TIMEOUT_S) -> None:
        if self._stream is not None:
            wait_stream(self._stream, timeout_s,
                        f"shm_ring copies into the pool of {self.worker!r}")

    def close(self) -> None:
        self._closed = True
        if self._stream is not None:  # no copy may still run into a mapping we unmap
            self._settle_for_close()
        for mapping in self._peers.values():
            mapping.close()
        self._peers.clear()
        if self._own is not None:
            own, self._own = self._own, None
            own.close()
            own.unlink()
            self._free, self._leases, self._unstamped = [], {}, {}

    # internals
    def _ensure_ring(self) -> RingMapping:
        if self._own is None:
            if self._closed:
                raise TransportError(f"shm_ring transport of {self.worker!r} is closed")
            self._own = create_ring(self.worker, self.num_slots, self.block_shape,
                                    self.kv_pool.dtype, pin=self._stream is not None)
            self._free = list(range(self.num_slots))
        return self._own

    def _attach(self, name: str, num_slots: int) -> RingMapping:
        mapping = self._peers.get(name)
        if mapping is None:
            mapping = self._peers[name] = attach_ring(name, num_slots, self.block_shape,
                                                      self.kv_pool.dtype,
                                                      pin=self._stream is not None)
        assert mapping.ring is not None
        if mapping.ring.shape[0] != num_slots:
            raise TransportError(f"handle says ring {name!r} has {num_slots} slots; "
                                 f"it was mapped with {mapping.ring.shape[0]}")
        return mapping

    def _alloc(self, n: int) -> list[int] | None:
        """n free slots, one consecutive stretch if there is one; None if fewer are free."""
        if n > len(self._free):
            return None
        free = self._free
        for i in range(len(free) - n + 1):
            if free[i + n - 1] - free[i] == n - 1:
                slots = free[i:i + n]
                break
        else:
            slots = free[:n]
        taken = set(slots)
        self._free = [s for s in free if s not in taken]
        return slots

    def _words_by_block(self) -> torch.Tensor:
        """The pool as [num_blocks, *block_shape] (a view), in 8-byte words."""
        return as_words(self.kv_pool).permute(2, 0, 1, 3, 4, 5)

    def _copy_to_ring(self, own: RingMapping, src_block_ids: list[int], slots: list[int],
                      token: int) -> None:
        assert own.ring is not None and own.stamps is not None
        by_block, ring = self._words_by_block(), as_words(own.ring)
        if self._stream is None:  # CPU: gather straight into each stretch of slots
            src = torch.tensor(src_block_ids, dtype=torch.long)
            for first, count, off in slot_runs(slots):
                torch.index_select(by_block, 0, src[off:off + count],
                                   out=ring[first:first + count])
            own.stamps[torch.tensor(slots)] = token
            return
        self._stream.wait_stream(torch.cuda.current_stream(self.device))
        pieces = []
        with torch.cuda.stream(self._stream):
            src = torch.tensor(src_block_ids, dtype=torch.long, pin_memory=True)
            staged = by_block.index_select(0, src.to(self.device, non_blocking=True))
            for start in range(0, len(slots), self.piece_slots):  # one DMA per stretch of slots
                part = slots[start:start + self.piece_slots]
                for first, count, off in slot_runs(part):
                    ring[first:first + count].copy_(staged[start + off:start + off + count],
                                                    non_blocking=True)
                copied = torch.cuda.Event()
                copied.record(self._stream)
                pieces.append((copied, torch.tensor(part)))
        self._unstamped[token] = pieces

    def _copy_from_ring(self, mapping: RingMapping, handle: dict, dst_block_ids: list[int],
                        timeout_s: float) -> None:
        assert mapping.ring is not None and mapping.stamps is not None
        by_block, ring, stamps = self._words_by_block(), as_words(mapping.ring), mapping.stamps
        slots, token, step = handle["slots"], handle["token"], handle["piece_slots"]

        def wait_piece(part: list[int]) -> None:
            ids = torch.tensor(part)
            wait_until(lambda: bool((stamps[ids] == token).all()), timeout_s,
                       f"the data of transfer {handle['rid']!r} in ring {handle['ring']!r} "
                       f"slots {part[0]}.. (its prefill worker failed, or the handle is stale)")

        if self._stream is None:  # CPU: each piece straight into the pool once it is there
            for start in range(0, len(slots), step):
                wait_piece(slots[start:start + step])
                for dst, first, count in block_runs(dst_block_ids[start:start + step],
                                                    slots[start:start + step]):
                    by_block[dst:dst + count].copy_(ring[first:first + count])
            return
        self._stream.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(self._stream):
            staged = torch.empty((len(slots), *ring.shape[1:]), dtype=ring.dtype,
                                 device=self.device)
            for start in range(0, len(slots), step):  # one DMA per stretch of slots
                part = slots[start:start + step]
                wait_piece(part)
                for first, count, off in slot_runs(part):
                    staged[start + off:start + off + count].copy_(ring[first:first + count],
                                                                  non_blocking=True)
            dst = torch.tensor(dst_block_ids, dtype=torch.long, pin_memory=True)
            by_block.index_copy_(0, dst.to(self.device, non_blocking=True), staged)
