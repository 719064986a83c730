"""The KV transport interface: move whole KV blocks from a prefill pool to a decode pool.

One transport object per worker process, built on the worker's KV pool
`[num_layers, 2, num_blocks, block_size, num_kv_heads, head_dim]`. A block moves whole:
all layers, K and V. Control travels separately (KvReady / KvAck); what a transport puts
in `export()` and in a handle is plain msgpack data (str, int, float, bytes, list, dict).

    # prefill worker P                          # decode worker D
    export = t.export()        --Heartbeat-->   (kept per peer)
    handle = t.send(rid, src)
    ... t.poll(handle) is True --KvReady--->    t.recv(export, handle, dst)
    t.release(handle)          <--KvAck-----

On a GPU, `send` only queues the copies on a side stream, after the work queued so far (the
prefill step that wrote the KV), and returns: the caller goes on computing while they run,
and sends the handle to the peer once `poll(handle)` says the KV is ready. `recv(...,
wait=False)` likewise queues the copies into our blocks and returns; `wait_received` then
waits for every such copy, before the blocks are used, freed or acknowledged.
"""

from __future__ import annotations

import logging
import time
from abc import ABC, abstractmethod
from typing import Any, ClassVar

import torch

DEFAULT_TIMEOUT_S = 10.0
log = logging.getLogger(__name__)


class TransportError(ValueError):
    """An export, handle or block list that does not fit this transport or pool."""


def wait_until(ready: Any, timeout_s: float, what: str) -> None:
    """Poll `ready()` until it is true, yielding the CPU in between; TransportError after
    `timeout_s`. For waits of micro- to milliseconds (copies already under way)."""
    deadline = time.monotonic() + timeout_s
    polls = 0
    while not ready():
        if time.monotonic() > deadline:
            raise TransportError(f"timed out after {timeout_s:g} s waiting for {what}")
        polls += 1
        time.sleep(0 if polls < 1000 else 1e-4)


def wait_stream(stream: torch.cuda.Stream, timeout_s: float, what: str) -> None:
    """Wait, at most `timeout_s`, for the work queued on a CUDA stream so far."""
    done = torch.cuda.Event()
    done.record(stream)
    wait_until(done.query, timeout_s, what)


def block_runs(src: list[int], dst: list[int]) -> list[tuple[int, int, int]]:
    """Maximal (src_start, dst_start, length) runs where both id lists are consecutive."""
    runs: list[list[int]] = []
    for s, d in zip(src, dst, strict=True):
        if runs and runs[-1][0] + runs[-1][2] == s and runs[-1][1] + runs[-1][2] == d:
            runs[-1][2] += 1
        else:
            runs.append([s, d, 1])
    return [(s, d, n) for s, d, n in runs]


def as_words(t: torch.Tensor) -> torch.Tensor:
    """The same bytes viewed as int64 when the last dim allows it: copies and gathers move
    8 bytes per element instead of 2 (bf16), and bits are bits (no float semantics)."""
    if (t.shape[-1] * t.element_size()) % 8 == 0:
        return t.view(torch.int64)
    return t.view(torch.uint8)


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def dtype_from_name(name: str) -> torch.dtype:
    dtype = getattr(torch, name, None) if isinstance(name, str) else None
    if not isinstance(dtype, torch.dtype):
        raise TransportError(f"unknown dtype {name!r} in a KV transport handle")
    return dtype


class KvTransport(ABC):
    """Moves KV blocks between the pools of two workers; see the module docstring."""

    name: ClassVar[str] = ""
    # the peer's recv itself waits for data of a handle sent before `poll` was true
    recv_waits_for_send: ClassVar[bool] = False

    def __init__(self, kv_pool: torch.Tensor, worker: str = "worker") -> None:
        if kv_pool.dim() != 6 or kv_pool.shape[1] != 2:
            raise TransportError(
                f"KV pool has shape {list(kv_pool.shape)}; expected [num_layers, 2, "
                "num_blocks, block_size, num_kv_heads, head_dim]"
            )
        self.kv_pool = kv_pool
        self.worker = worker
        self.device = kv_pool.device

    @property
    def num_blocks(self) -> int:
        return self.kv_pool.shape[2]

    @property
    def block_shape(self) -> list[int]:
        """Shape of one block, all layers, K and V: [num_layers, 2, block_size, heads, dim]."""
        num_layers, two, _, block_size, num_kv_heads, head_dim = self.kv_pool.shape
        return [num_layers, two, block_size, num_kv_heads, head_dim]

    @property
    def block_nbytes(self) -> int:
        return self.kv_pool[:, :, 0].numel() * self.kv_pool.element_size()

    # prefill side
    @abstractmethod
    def export(self) -> dict:
        """What a peer needs to attach to this worker, once at start-up (may be {})."""

    @abstractmethod
    def send(self, rid: str, src_block_ids: list[int]) -> dict | None:
        """Start exposing or copying the blocks; the handle, or None if no room now. `rid`
        names this transfer (one request may make several, with distinct names)."""

    def poll(self, handle: dict) -> bool:
        """True once the handle's KV is ready for the peer; never blocks. Send the handle
        only then, unless `recv_waits_for_send` (then the peer's recv waits, at most its
        timeout, for data the producer is still copying: a pipeline, while it polls). A
        producer must poll each handle it sends until true: shm_ring stamps its slots here."""
        return True

    def wait_sent(self, handle: dict, timeout_s: float = DEFAULT_TIMEOUT_S) -> None:
        """Block until `poll(handle)` is true, or TransportError after `timeout_s`."""
        wait_until(lambda: self.poll(handle), timeout_s,
                   f"{self.name} send of {handle.get('rid')!r}")

    @abstractmethod
    def release(self, handle: dict) -> None:
        """The peer took the KV (KvAck) or the lease expired: free the handle's resources."""

    # decode side
    @abstractmethod
    def recv(self, peer_export: dict, handle: dict, dst_block_ids: list[int], *,
             wait: bool = True, timeout_s: float = DEFAULT_TIMEOUT_S) -> None:
        """Copy the handle's blocks into ours. `wait`: on return the data is in place;
        else (GPU) the copies may still run: call `wait_received` before using, freeing or
        acknowledging the blocks. Waits at most `timeout_s` for the peer's data."""

    def wait_received(self, timeout_s: float = DEFAULT_TIMEOUT_S) -> None:
        """Every `recv(..., wait=False)` so far has landed (a no-op where recv is synchronous)."""
        return None

    @abstractmethod
    def close(self) -> None:
        """Free what this transport holds; safe to call twice."""

    def _settle_for_close(self) -> None:
        """Wait (bounded) for our side stream before memory it touches goes away."""
        stream = getattr(self, "_stream", None)
        if stream is None:
            return
        try:
            wait_stream(stream, DEFAULT_TIMEOUT_S, f"{self.name} copies of {self.worker!r}")
        except TransportError as e:
            log.error("closing with copies still running: %s", e)

    def __enter__(self) -> KvTransport:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # checks shared by the transports
    def check_block_ids(self, block_ids: list[int], what: str, num_blocks: int | None = None,
                        unique: bool = False) -> None:
        limit = self.num_blocks if num_blocks is None else num_blocks
        # every type exactly int (no bools, no floats), then min/max: loops in C (512 ids, the
        # blocks of an 8k-token prompt: 20 us here, 27 with one Python test per id)
        if block_ids and (set(map(type, block_ids)) != {int}
                          or min(block_ids) < 0 or max(block_ids) >= limit):
            bad = next(b for b in block_ids if type(b) is not int or not 0 <= b < limit)
            raise TransportError(f"{what} has block id {bad!r}; the pool has {limit} blocks")
        if unique and len(set(block_ids)) != len(block_ids):
            raise TransportError(f"{what} names a block twice: {block_ids}")

    def check_handle(self, handle: Any, fields: tuple[str, ...], what: str = "handle") -> None:
        if not isinstance(handle, dict):
            kind = type(handle).__name__
            raise TransportError(f"a {self.name} {what} must be a dict, got {kind}")
        if handle.get("transport") != self.name:
            raise TransportError(
                f"{what} is for transport {handle.get('transport')!r}; this is {self.name!r}"
            )
        missing = [f for f in fields if f not in handle]
        if missing:
            raise TransportError(f"{self.name} {what} lacks {missing}")

    def check_layout(self, block_shape: list[int], dtype: str, where: str) -> None:
        """The peer's blocks must have our shape and dtype (same model, same block size)."""
        if list(block_shape) != self.block_shape or dtype != dtype_name(self.kv_pool.dtype):
            raise TransportError(
                f"{where} holds KV blocks of shape {list(block_shape)} and dtype {dtype}; this "
                f"pool's blocks are {self.block_shape} {dtype_name(self.kv_pool.dtype)} "
                "(prefill and decode must run the same model, dtype and block size)"
            )
