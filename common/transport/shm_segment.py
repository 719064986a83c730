"""The shared-memory segment under an shm_ring: creating, attaching, pinning, unlinking.

Layout: a header of one int64 stamp per slot (rounded up to a page), then `num_slots`
slots of `slot_nbytes` each. The creator (prefill worker) makes it with `SharedMemory` and
unlinks it on close. A peer (decode worker) maps `/dev/shm/<name>` with a plain mmap rather
than `SharedMemory(name)`: before Python 3.13 attaching registers the segment with the
resource tracker, which then unlinks it under the prefill worker, and unregistering it
instead would also drop the creator's registration when both processes share one tracker
(multiprocessing children).
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

from common.transport.base import TransportError

log = logging.getLogger(__name__)

SHM_DIR = "/dev/shm"
_PAGE_NBYTES = 4096
_CUDA_HOST_REGISTER_PORTABLE = 1  # pinned for every device context of the process


def header_nbytes(num_slots: int) -> int:
    """Bytes before the first slot: the stamps, rounded up to a page."""
    return -(-8 * num_slots // _PAGE_NBYTES) * _PAGE_NBYTES


@dataclass
class RingMapping:
    """A ring mapped into this process: the tensor views and what keeps them alive."""

    name: str
    owner: shared_memory.SharedMemory | mmap.mmap
    ring: torch.Tensor | None  # [num_slots, *slot_shape] of the pool's dtype
    stamps: torch.Tensor | None  # [num_slots] int64: token of the transfer whose data is there
    pinned_ptr: int = 0

    def close(self) -> None:
        if self.pinned_ptr:
            err = torch.cuda.cudart().cudaHostUnregister(self.pinned_ptr)
            if int(err) != 0:
                log.warning("cudaHostUnregister of ring %s failed (error %d)", self.name, int(err))
            self.pinned_ptr = 0
        self.ring = self.stamps = None  # drop the buffer exports before closing the mapping
        try:
            self.owner.close()
        except BufferError:
            log.warning("ring %s still has tensor views; it stays mapped until exit", self.name)

    def unlink(self) -> None:
        """Creator only: remove the segment's name (peers keep their mappings until closed)."""
        if isinstance(self.owner, shared_memory.SharedMemory):
            try:
                self.owner.unlink()
            except FileNotFoundError:
                pass


def create_ring(worker: str, num_slots: int, slot_shape: list[int], dtype: torch.dtype,
                pin: bool) -> RingMapping:
    """A fresh zeroed segment named after the worker and this process (stamps 0: empty)."""
    worker = re.sub(r"[^A-Za-z0-9_.-]", "_", worker)[:64]
    name = f"nanopd_{worker}_{os.getpid()}_{secrets.token_hex(4)}"
    shm = shared_memory.SharedMemory(name=name, create=True,
                                     size=_segment_nbytes(num_slots, slot_shape, dtype))
    log.info("shm ring %s: %d slots of shape %s", shm.name, num_slots, slot_shape)
    return _map(shm.name, shm, shm.buf, num_slots, slot_shape, dtype, pin)


def attach_ring(name: str, num_slots: int, slot_shape: list[int], dtype: torch.dtype,
                pin: bool) -> RingMapping:
    """Map a peer's segment; TransportError if it is gone or smaller than the handle says."""
    nbytes = _segment_nbytes(num_slots, slot_shape, dtype)
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
            raise TransportError(f"shm ring {name!r} has {size} bytes; the handle needs "
                                 f"{num_slots} slots of shape {slot_shape} ({nbytes} bytes)")
        mm = mmap.mmap(fd, nbytes)
    finally:
        os.close(fd)
    return _map(name, mm, mm, num_slots, slot_shape, dtype, pin)


def _slot_nbytes(slot_shape: list[int], dtype: torch.dtype) -> int:
    n = torch.empty(0, dtype=dtype).element_size()
    for d in slot_shape:
        n *= d
    return n


def _segment_nbytes(num_slots: int, slot_shape: list[int], dtype: torch.dtype) -> int:
    return header_nbytes(num_slots) + num_slots * _slot_nbytes(slot_shape, dtype)


def _map(name: str, owner: shared_memory.SharedMemory | mmap.mmap,
         buf: memoryview | mmap.mmap, num_slots: int, slot_shape: list[int],
         dtype: torch.dtype, pin: bool) -> RingMapping:
    stamps = torch.frombuffer(buf, dtype=torch.int64, count=num_slots)
    flat = torch.frombuffer(buf, dtype=torch.uint8,
                            count=num_slots * _slot_nbytes(slot_shape, dtype),
                            offset=header_nbytes(num_slots))
    ring = flat.view(dtype).view(num_slots, *slot_shape)
    mapping = RingMapping(name, owner, ring, stamps)
    if pin:  # the slots only: stamps are read and written by CPUs
        ptr, nbytes = ring.data_ptr(), ring.numel() * ring.element_size()
        err = torch.cuda.cudart().cudaHostRegister(ptr, nbytes, _CUDA_HOST_REGISTER_PORTABLE)
        if int(err) == 0:
            mapping.pinned_ptr = ptr
        else:
            log.warning("cudaHostRegister of ring %s (%d bytes) failed (error %d); copies "
                        "run at pageable speed (check ulimit -l)", name, nbytes, int(err))
    return mapping
