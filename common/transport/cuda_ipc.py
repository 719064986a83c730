"""cuda_ipc: the decode worker pulls KV blocks straight out of the prefill worker's GPU pool.

The prefill worker exports its whole pool once, as the CUDA IPC handle of the pool's
storage (torch's `UntypedStorage._share_cuda_()`, the tuple torch.multiprocessing sends,
here as plain msgpack data). The decode worker opens it once per peer
(`UntypedStorage._new_shared_cuda`), views it as the peer's pool on the peer's GPU, and a
transfer is one strided peer copy per run of consecutive blocks or, for fragmented lists,
one gather on the peer's GPU, one peer-to-peer copy and one scatter into our pool (in
chunks of at most `max_staged_nbytes`), on a side stream; `recv(wait=True)` waits for them,
`recv(wait=False)` leaves that to `wait_received`. `send` copies nothing: it records an
event after the queued work that writes the KV, `poll` is true once that event has
completed (the handle goes out only then, so the decode side never waits on another
process's GPU work), and the prefill worker keeps the blocks until `release`.

Both GPUs must be visible in the decode process (pick the device with torch.cuda.set_device,
not CUDA_VISIBLE_DEVICES); the peer's GPU is found by UUID. The decode process gets a
CUDA context on the peer's GPU and keeps its staging buffer there (the caching allocator).
"""

from __future__ import annotations

import itertools
import os
import weakref
from collections.abc import Callable

import numpy as np
import torch

from common.transport.base import (
    DEFAULT_TIMEOUT_S,
    KvTransport,
    TransportError,
    block_runs,
    dtype_from_name,
    dtype_name,
    wait_stream,
)

DEFAULT_MAX_STAGED_NBYTES = 256 * 2**20
_EXPORT_FIELDS = ("pid", "device", "device_uuid", "storage", "shape", "stride",
                  "storage_offset", "dtype")
_STORAGE_FIELDS = ("handle", "nbytes", "offset_nbytes", "ref_counter_handle",
                   "ref_counter_offset", "event_handle", "event_sync_required")
# pools exported by this process, by IPC handle: a process cannot open its own IPC handle
_LOCAL_POOLS: weakref.WeakValueDictionary[bytes, torch.Tensor] = weakref.WeakValueDictionary()


def device_uuid(index: int) -> str:
    return str(getattr(torch.cuda.get_device_properties(index), "uuid", ""))


def _local_device_index(peer_export: dict) -> int:
    uuid = peer_export["device_uuid"]
    if uuid:
        for i in range(torch.cuda.device_count()):
            if device_uuid(i) == uuid:
                return i
        raise TransportError(
            f"the peer's GPU (uuid {uuid}) is not visible in this process; cuda_ipc needs "
            "both GPUs visible (select devices with torch.cuda.set_device, not "
            "CUDA_VISIBLE_DEVICES), or use shm_ring"
        )
    return int(peer_export["device"])



MAX_DIRECT_RUNS = 32  # more fragmented than this: gather, one P2P copy, scatter
# copy_blocks(src_pool, dst_pool, src_ids, dst_ids): every layer's K and V of each block pair,
# dst_pool[:, :, dst_ids] = src_pool[:, :, src_ids], queued on the current stream
BlockCopy = Callable[[torch.Tensor, torch.Tensor, list[int], list[int]], None]


class CudaIpcTransport(KvTransport):
    name = "cuda_ipc"

    def __init__(self, kv_pool: torch.Tensor, worker: str = "worker",
                 max_staged_nbytes: int = DEFAULT_MAX_STAGED_NBYTES,
                 copy_blocks: BlockCopy | None = None) -> None:
        super().__init__(kv_pool, worker)
        if self.device.type != "cuda":
            raise TransportError(
                f"cuda_ipc needs the KV pool on a GPU; this pool is on {self.device} "
                "(use shm_ring)"
            )
        self.blocks_per_copy = max(1, max_staged_nbytes // self.block_nbytes)
        self.copy_blocks = copy_blocks
        self._export: dict | None = None
        self._peers: dict[bytes, torch.Tensor] = {}  # IPC handle -> the peer's pool
        self._stream = torch.cuda.Stream(self.device)
        self._numbers = itertools.count(1)
        self._written: dict[int, torch.cuda.Event] = {}  # send number -> its KV is written

    # prefill side
    def export(self) -> dict:
        if self._export is None:  # share once: each _share_cuda_ call adds a ref counter
            (device, handle, nbytes, offset_nbytes, ref_counter_handle, ref_counter_offset,
             event_handle, event_sync_required) = self.kv_pool.untyped_storage()._share_cuda_()
            self._export = {
                "transport": self.name, "worker": self.worker, "pid": os.getpid(),
                "device": int(device), "device_uuid": device_uuid(int(device)),
                "storage": {
                    "handle": bytes(handle), "nbytes": int(nbytes),
                    "offset_nbytes": int(offset_nbytes),
                    "ref_counter_handle": bytes(ref_counter_handle),
                    "ref_counter_offset": int(ref_counter_offset),
                    "event_handle": bytes(event_handle),
                    "event_sync_required": int(bool(event_sync_required)),
                },
                "shape": list(self.kv_pool.shape), "stride": list(self.kv_pool.stride()),
                "storage_offset": self.kv_pool.storage_offset(),
                "dtype": dtype_name(self.kv_pool.dtype),
            }
            _LOCAL_POOLS[bytes(handle)] = self.kv_pool
        return self._export

    def send(self, rid: str, src_block_ids: list[int]) -> dict | None:
        self.check_block_ids(src_block_ids, "src_block_ids")
        self.export()
        written = torch.cuda.Event()  # after the queued work that writes the KV
        written.record(torch.cuda.current_stream(self.device))
        number = next(self._numbers)
        self._written[number] = written
        return {"transport": self.name, "rid": rid, "block_ids": list(src_block_ids),
                "number": number}

    def poll(self, handle: dict) -> bool:
        """The peer may read the blocks once the prefill work that writes them has run."""
        written = self._written.get(handle.get("number"))
        if written is not None and not written.query():
            return False
        self._written.pop(handle.get("number"), None)
        return True

    def release(self, handle: dict) -> None:
        self.check_handle(handle, ("rid", "block_ids"))  # the caller frees the blocks
        self._written.pop(handle.get("number"), None)

    # decode side
    def recv(self, peer_export: dict, handle: dict, dst_block_ids: list[int], *,
             wait: bool = True, timeout_s: float = DEFAULT_TIMEOUT_S) -> None:
        self.check_handle(handle, ("rid", "block_ids"))
        src_block_ids = handle["block_ids"]
        if len(src_block_ids) != len(dst_block_ids):
            raise TransportError(f"handle has {len(src_block_ids)} source blocks for "
                                 f"{len(dst_block_ids)} destination blocks")
        peer_pool = self._open(peer_export)
        self.check_block_ids(src_block_ids, "handle block_ids", peer_pool.shape[2])
        self.check_block_ids(dst_block_ids, "dst_block_ids", unique=True)
        if not src_block_ids:
            return
        self._stream.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(self._stream):
            if self.copy_blocks is not None:  # one launch reads every block out of the peer's pool
                # both id lists (checked above) as one pinned [2, n] array and one upload,
                # passed as device tensors (not re-checked): for 512 blocks the conversion
                # takes 17 us on this CPU where checking and converting the two lists one by
                # one took 104, and one upload replaces two
                ids = torch.from_numpy(np.array([src_block_ids, dst_block_ids], dtype=np.int64))
                ids = ids.pin_memory().to(self.device, non_blocking=True)
                self.copy_blocks(peer_pool, self.kv_pool, ids[0], ids[1])
            elif len(runs := block_runs(src_block_ids, dst_block_ids)) <= MAX_DIRECT_RUNS:
                # one strided peer-to-peer copy per run of consecutive blocks: torch runs it
                # as a kernel that reads the peer's pool over NVLink, no staging
                for s, d, n in runs:
                    self.kv_pool[:, :, d:d + n].copy_(peer_pool[:, :, s:s + n],
                                                      non_blocking=True)
            else:
                self._staged_copy(peer_pool, src_block_ids, dst_block_ids)
        if wait:
            self.wait_received(timeout_s)

    def wait_received(self, timeout_s: float = DEFAULT_TIMEOUT_S) -> None:
        wait_stream(self._stream, timeout_s, f"cuda_ipc copies into the pool of {self.worker!r}")

    def _staged_copy(self, peer_pool: torch.Tensor, src_block_ids: list[int],
                     dst_block_ids: list[int]) -> None:
        """Fragmented lists: gather on the peer's GPU, one P2P copy, scatter on ours."""
        step = self.blocks_per_copy
        for i in range(0, len(src_block_ids), step):
            src = torch.tensor(src_block_ids[i:i + step], device=peer_pool.device)
            dst = torch.tensor(dst_block_ids[i:i + step], device=self.device)
            staged = peer_pool.index_select(2, src)  # gather, on the peer's GPU
            staged = staged.to(self.device, non_blocking=True)  # one P2P copy
            self.kv_pool.index_copy_(2, dst, staged)  # scatter, on ours

    def close(self) -> None:
        self._settle_for_close()  # no copy may still read a peer's pool we let go
        self._peers.clear()  # the IPC mappings close when their storages die
        if self._export is not None:
            _LOCAL_POOLS.pop(self._export["storage"]["handle"], None)

    # internals
    def _open(self, peer_export: dict) -> torch.Tensor:
        self.check_handle(peer_export, _EXPORT_FIELDS, "export")
        storage = peer_export["storage"]
        if not isinstance(storage, dict) or any(f not in storage for f in _STORAGE_FIELDS):
            raise TransportError(f"cuda_ipc export's storage must have {list(_STORAGE_FIELDS)}")
        key = bytes(storage["handle"])
        pool = self._peers.get(key)
        if pool is not None:
            return pool
        shape = [int(x) for x in peer_export["shape"]]
        if len(shape) != 6:
            raise TransportError(f"peer's KV pool has shape {shape}; expected 6 dimensions")
        self.check_layout([shape[0], shape[1], *shape[3:]], peer_export["dtype"],
                          f"peer {peer_export.get('worker', '?')!r}")
        if peer_export["pid"] == os.getpid():
            pool = _LOCAL_POOLS.get(key)
            if pool is None:
                raise TransportError("cuda_ipc export is from this process but its pool is gone")
        else:
            index = _local_device_index(peer_export)
            torch.cuda._lazy_init()
            untyped = torch.UntypedStorage._new_shared_cuda(
                index, key, int(storage["nbytes"]), int(storage["offset_nbytes"]),
                bytes(storage["ref_counter_handle"]), int(storage["ref_counter_offset"]),
                bytes(storage["event_handle"]), bool(storage["event_sync_required"]),
            )
            pool = torch.empty(0, dtype=dtype_from_name(peer_export["dtype"]),
                               device=torch.device("cuda", index))
            pool.set_(untyped, int(peer_export["storage_offset"]), shape,
                      [int(x) for x in peer_export["stride"]])
        self._peers[key] = pool
        return pool
