"""shm_ring: KV blocks through a POSIX shared-memory ring of fixed-size slots (one host).

The prefill worker owns the ring: `num_slots` slots of one KV block each (all layers, K and
V: `[num_layers, 2, block_size, num_kv_heads, head_dim]`, the pool's dtype), in a shared
memory segment `/dev/shm/nanopd_<worker>_<pid>_<random>`. `send` takes free slots (a free
list on the prefill side; none if the ring is full), gathers the blocks into them and
names them in the handle; the decode worker maps the ring once per peer and scatters the
slots into its blocks; `release` (on KvAck or lease expiry) frees the slots.

Works for any pair of devices: the copies go device -> ring -> device. With a GPU pool the
mapping is registered as pinned memory in that process, so the copies run at DMA speed.

The decode side maps `/dev/shm/<ring>` with a plain mmap rather than `SharedMemory(name)`:
before Python 3.13 attaching registers the segment with the resource tracker, which then
unlinks it under the prefill worker, and unregistering it instead would also drop the
creator's registration when both processes share one tracker (multiprocessing children).
"""

from __future__ import annotations

import logging
import mmap
import os
import re
import secrets
from dataclasses import dataclass
from multiprocessing import shared_memory

import torch

from common.transport.base import KvTransport, TransportError, dtype_name

log = logging.getLogger(__name__)

SHM_DIR = "/dev/shm"
DEFAULT_RING_NBYTES = 256 * 2**20
_HANDLE_FIELDS = ("ring", "rid", "slots", "num_slots", "slot_shape", "dtype")
_CUDA_HOST_REGISTER_PORTABLE = 1  # pinned for every device context of the process


@dataclass
class _Mapping:
    """A ring mapped into this process: the tensor view and what keeps it alive."""

    name: str
    owner: shared_memory.SharedMemory | mmap.mmap
    ring: torch.Tensor | None  # [num_slots, *block_shape]
    pinned_ptr: int = 0

    def close(self) -> None:
        if self.pinned_ptr:
            err = torch.cuda.cudart().cudaHostUnregister(self.pinned_ptr)
            if int(err) != 0:
                log.warning("cudaHostUnregister of ring %s failed (error %d)", self.name, int(err))
            self.pinned_ptr = 0
        self.ring = None  # drop the buffer export before closing the mapping
        try:
            self.owner.close()
        except BufferError:
            log.warning("ring %s still has tensor views; it stays mapped until exit", self.name)


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

    def __init__(self, kv_pool: torch.Tensor, worker: str = "worker",
                 num_slots: int | None = None, ring_nbytes: int = DEFAULT_RING_NBYTES) -> None:
        super().__init__(kv_pool, worker)
        self.num_slots = num_slots if num_slots is not None else ring_nbytes // self.block_nbytes
        if self.num_slots < 1:
            raise TransportError(
                f"shm ring of {self.num_slots} slots; one KV block is {self.block_nbytes} "
                f"bytes and ring_nbytes is {ring_nbytes}: raise ring_nbytes or num_slots"
            )
        self._own: _Mapping | None = None  # prefill side: created on first export/send
        self._free: list[int] = []  # sorted free slot ids
        self._leases: dict[str, list[int]] = {}  # rid -> its slots, until released
        self._peers: dict[str, _Mapping] = {}  # decode side: ring name -> mapping
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
        try:
            if slots:
                self._copy_to_ring(own.ring, src_block_ids, slots)
        except BaseException:
            self._free = sorted(self._free + slots)
            raise
        self._leases[rid] = slots
        return {**self.export(), "rid": rid, "slots": slots}

    def release(self, handle: dict) -> None:
        self.check_handle(handle, _HANDLE_FIELDS)
        own_name = self._own.name if self._own is not None else None
        if handle["ring"] != own_name:
            raise TransportError(
                f"handle is for ring {handle['ring']!r}; this worker's ring is {own_name!r}"
            )
        if self._leases.get(handle["rid"]) == handle["slots"]:
            self._free = sorted(self._free + self._leases.pop(handle["rid"]))
        # else: released already (KvAck after lease expiry); nothing to do

    # decode side
    def recv(self, peer_export: dict, handle: dict, dst_block_ids: list[int]) -> None:
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
        if slots:
            ring = self._attach(handle["ring"], handle["num_slots"])
            self._copy_from_ring(ring, slots, dst_block_ids)

    def close(self) -> None:
        self._closed = True
        for mapping in self._peers.values():
            mapping.close()
        self._peers.clear()
        if self._own is not None:
            own, self._own = self._own, None
            own.close()
            try:
                own.owner.unlink()
            except FileNotFoundError:
                pass
            self._free, self._leases = [], {}

    # internals
    def _ensure_ring(self) -> _Mapping:
        if self._own is None:
            if self._closed:
                raise TransportError(f"shm_ring transport of {self.worker!r} is closed")
            worker = re.sub(r"[^A-Za-z0-9_.-]", "_", self.worker)[:64]
            name = f"nanopd_{worker}_{os.getpid()}_{secrets.token_hex(4)}"
            nbytes = self.num_slots * self.block_nbytes
            shm = shared_memory.SharedMemory(name=name, create=True, size=nbytes)
            self._own = self._map(shm.name, shm, shm.buf)
            self._free = list(range(self.num_slots))
            log.info("shm ring %s: %d slots of %d bytes", shm.name, self.num_slots,
                     self.block_nbytes)
        return self._own

    def _attach(self, name: str, num_slots: int) -> torch.Tensor:
        mapping = self._peers.get(name)
        if mapping is None:
            nbytes = num_slots * self.block_nbytes
            try:
                fd = os.open(os.path.join(SHM_DIR, name), os.O_RDWR)
            except FileNotFoundError:
                raise TransportError(
                    f"shm ring {name!r} is not in {SHM_DIR}: its prefill worker closed it or "
                    "runs on another host (use the dist transport across hosts)"
                ) from None
            try:
                size = os.fstat(fd).st_size
                if size < nbytes:
                    raise TransportError(f"shm ring {name!r} has {size} bytes; the handle "
                                         f"needs {num_slots} slots of {self.block_nbytes}")
                mm = mmap.mmap(fd, nbytes)
            finally:
                os.close(fd)
            mapping = self._peers[name] = self._map(name, mm, mm, num_slots)
        assert mapping.ring is not None
        if mapping.ring.shape[0] != num_slots:
            raise TransportError(f"handle says ring {name!r} has {num_slots} slots; "
                                 f"it was mapped with {mapping.ring.shape[0]}")
        return mapping.ring

    def _map(self, name: str, owner: shared_memory.SharedMemory | mmap.mmap,
             buf: memoryview | mmap.mmap, num_slots: int | None = None) -> _Mapping:
        num_slots = self.num_slots if num_slots is None else num_slots
        flat = torch.frombuffer(buf, dtype=torch.uint8, count=num_slots * self.block_nbytes)
        ring = flat.view(self.kv_pool.dtype).view(num_slots, *self.block_shape)
        mapping = _Mapping(name, owner, ring)
        if self.device.type == "cuda":
            ptr, nbytes = ring.data_ptr(), ring.numel() * ring.element_size()
            err = torch.cuda.cudart().cudaHostRegister(ptr, nbytes, _CUDA_HOST_REGISTER_PORTABLE)
            if int(err) == 0:
                mapping.pinned_ptr = ptr
            else:
                log.warning("cudaHostRegister of ring %s (%d bytes) failed (error %d); copies "
                            "run at pageable speed (check ulimit -l)", name, nbytes, int(err))
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

    def _by_block(self) -> torch.Tensor:
        return self.kv_pool.permute(2, 0, 1, 3, 4, 5)  # [num_blocks, *block_shape] view

    def _copy_to_ring(self, ring: torch.Tensor, src_block_ids: list[int],
                      slots: list[int]) -> None:
        by_block = self._by_block()
        if self._stream is None:  # CPU: gather straight into each stretch of slots
            src = torch.tensor(src_block_ids, dtype=torch.long)
            for first, count, off in slot_runs(slots):
                torch.index_select(by_block, 0, src[off:off + count],
                                   out=ring[first:first + count])
            return
        self._stream.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(self._stream):
            src = torch.tensor(src_block_ids, dtype=torch.long, device=self.device)
            staged = by_block.index_select(0, src)  # one gather on the GPU
            for first, count, off in slot_runs(slots):  # one DMA per stretch of slots
                ring[first:first + count].copy_(staged[off:off + count], non_blocking=True)
        self._stream.synchronize()

    def _copy_from_ring(self, ring: torch.Tensor, slots: list[int],
                        dst_block_ids: list[int]) -> None:
        by_block = self._by_block()
        if self._stream is None:  # CPU: scatter each stretch of slots straight into the pool
            dst = torch.tensor(dst_block_ids, dtype=torch.long)
            for first, count, off in slot_runs(slots):
                by_block.index_copy_(0, dst[off:off + count], ring[first:first + count])
            return
        self._stream.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(self._stream):
            staged = torch.empty((len(slots), *self.block_shape), dtype=self.kv_pool.dtype,
                                 device=self.device)
            for first, count, off in slot_runs(slots):
                staged[off:off + count].copy_(ring[first:first + count], non_blocking=True)
            dst = torch.tensor(dst_block_ids, dtype=torch.long, device=self.device)
            by_block.index_copy_(0, dst, staged)  # one scatter on the GPU
        self._stream.synchronize()
