"""Where shm_ring's time goes on a GPU: each copy of one transfer alone, in one process.

Used by bench/kv_transfer.py (the `shm_ring_parts` rows). For N consecutive blocks of a GPU
pool: the gather into one contiguous buffer and the scatter back (`index_select` /
`index_copy_` over 8-byte words, CUDA events), csrc's copy_blocks kernel alone when built
(cuda_ipc's pull, here within one process), the device-to-host and host-to-device copy
of those bytes into a registered shared-memory ring (what shm_ring uses) and into
`pin_memory` host memory (what the pinned reference uses), and the wall time of the
transport's own calls in this process: `send` (queues the copies), until `poll` is true,
and `recv` into another pool.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable

import torch

from common.transport.base import as_words
from common.transport.shm_ring import ShmRingTransport
from common.transport.shm_segment import create_ring


def _events_s(run: Callable[[], object], warmup: int, reps: int) -> float:
    """Median seconds of `run` on the current stream, timed by CUDA events."""
    times = []
    for i in range(warmup + reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        run()
        end.record()
        end.synchronize()
        if i >= warmup:
            times.append(start.elapsed_time(end) / 1e3)
    return statistics.median(times)


def _wall_s(run: Callable[[], object], warmup: int, reps: int) -> float:
    times = []
    for i in range(warmup + reps):
        start = time.perf_counter()
        run()
        if i >= warmup:
            times.append(time.perf_counter() - start)
    return statistics.median(times)


def ring_parts(src_pool: torch.Tensor, dst_pool: torch.Tensor, block_counts: list[int],
               warmup: int, reps: int) -> list[dict]:
    """One row per block count; see the module docstring. Pools: [L, 2, blocks, ...]."""
    rows = []
    block_nbytes = src_pool[:, :, 0].numel() * src_pool.element_size()
    for n in block_counts:
        row = {"num_blocks": n, "nbytes": n * block_nbytes,
               **_copies(src_pool, dst_pool, n, warmup, reps),
               **_transport_calls(src_pool, dst_pool, n, warmup, reps)}
        for key in [k for k in row if k.endswith("_s")]:
            row[key.removesuffix("_s") + "_GBps"] = row["nbytes"] / row[key] / 1e9
        rows.append(row)
    return rows


def _copies(src_pool: torch.Tensor, dst_pool: torch.Tensor, n: int, warmup: int,
            reps: int) -> dict:
    """Each copy of an n-block transfer alone, on the GPU, timed by events."""
    by_block = as_words(src_pool).permute(2, 0, 1, 3, 4, 5)
    dst_by_block = as_words(dst_pool).permute(2, 0, 1, 3, 4, 5)
    block_shape = [src_pool.shape[0], 2, *src_pool.shape[3:]]
    ring_map = create_ring("bench-parts", n, block_shape, src_pool.dtype, pin=True)
    assert ring_map.ring is not None
    ring = as_words(ring_map.ring)
    pinned = torch.empty(ring.shape, dtype=ring.dtype, pin_memory=True)
    ids = list(range(n))
    idx = torch.tensor(ids, device=src_pool.device)
    dst_idx = torch.tensor(ids, device=dst_pool.device)
    staged = by_block.index_select(0, idx)
    back = torch.empty(staged.shape, dtype=staged.dtype, device=dst_pool.device)
    out = {"registered_pinned": bool(ring_map.pinned_ptr)}
    with torch.cuda.device(src_pool.device):
        out["gather_s"] = _events_s(lambda: by_block.index_select(0, idx), warmup, reps)
        out["d2h_ring_s"] = _events_s(lambda: ring.copy_(staged, non_blocking=True),
                                      warmup, reps)
        out["d2h_pin_memory_s"] = _events_s(lambda: pinned.copy_(staged, non_blocking=True),
                                            warmup, reps)
    with torch.cuda.device(dst_pool.device):
        out["h2d_ring_s"] = _events_s(lambda: back.copy_(ring, non_blocking=True), warmup, reps)
        out["h2d_pin_memory_s"] = _events_s(lambda: back.copy_(pinned, non_blocking=True),
                                            warmup, reps)
        out["scatter_s"] = _events_s(lambda: dst_by_block.index_copy_(0, dst_idx, back),
                                     warmup, reps)
        out.update(_copy_blocks_kernel(src_pool, dst_pool, n, warmup, reps))
    out["index_upload_s"] = _wall_s(
        lambda: torch.tensor(ids, pin_memory=True).to(src_pool.device, non_blocking=True),
        warmup, reps)
    ring = pinned = None  # the mapping's last views, before it closes
    ring_map.close()
    ring_map.unlink()
    return out


def _copy_blocks_kernel(src_pool: torch.Tensor, dst_pool: torch.Tensor, n: int, warmup: int,
                        reps: int) -> dict:
    """csrc's copy_blocks alone (what cuda_ipc's recv launches), when built: n blocks in one
    launch on the destination GPU, consecutive and scattered ids (ids already on the GPU)."""
    from services.worker.ops import cuda_ops

    if cuda_ops.load() is None:
        return {}
    g = torch.Generator().manual_seed(n)
    out = {}
    for layout, (src, dst) in {
        "consecutive": (torch.arange(n), torch.arange(n)),
        "scattered": (torch.randperm(src_pool.shape[2], generator=g)[:n],
                      torch.randperm(dst_pool.shape[2], generator=g)[:n]),
    }.items():
        src, dst = src.to(dst_pool.device), dst.to(dst_pool.device)
        out[f"copy_blocks_kernel_{layout}_s"] = _events_s(
            lambda src=src, dst=dst: cuda_ops.copy_blocks(src_pool, dst_pool, src, dst),
            warmup, reps)
    return out


def _transport_calls(src_pool: torch.Tensor, dst_pool: torch.Tensor, n: int, warmup: int,
                     reps: int) -> dict:
    """Wall time of the transport's calls in this process (no pipe, no second process)."""
    times: dict[str, list[float]] = {"send_call_s": [], "until_poll_s": [], "recv_call_s": []}
    with ShmRingTransport(src_pool, "bench-parts-p", num_slots=n) as p, \
            ShmRingTransport(dst_pool, "bench-parts-d") as d:
        for i in range(warmup + reps):
            start = time.perf_counter()
            handle = p.send(f"r{i}", list(range(n)))
            issued = time.perf_counter()
            assert handle is not None
            p.wait_sent(handle)
            sent = time.perf_counter()
            d.recv(p.export(), handle, list(range(n)))
            end = time.perf_counter()
            p.release(handle)
            if i >= warmup:
                for key, value in (("send_call_s", issued - start), ("until_poll_s", sent - start),
                                   ("recv_call_s", end - sent)):
                    times[key].append(value)
    return {k: statistics.median(v) for k, v in times.items()}
