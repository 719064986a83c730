"""The hardware references of bench/kv_transfer.py: what each transport is measured against.

- `bench_device_copy`: one `copy_` of --ref-nbytes from cuda:P to cuda:D in one process (P2P
  across two GPUs, a same-device copy within one), timed by CUDA events;
- `bench_pinned`: one copy of --ref-nbytes cuda:P -> pinned host (D2H) and one pinned host
  -> cuda:D (H2D);
- `bench_memcpy`: on the CPU, one host `copy_` of --ref-nbytes (wall clock).
Each is the median of --reps after --warmup; GB = 1e9 bytes.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch


def gbps(nbytes: int, seconds: float) -> float:
    return nbytes / seconds / 1e9


def median_s(run: Callable[[], float], warmup: int, reps: int) -> float:
    for _ in range(warmup):
        run()
    return statistics.median(run() for _ in range(reps))


def cuda_copy_s(dst: torch.Tensor, src: torch.Tensor, device: int) -> float:
    """One copy_, timed by events on the stream that runs it (the source device's)."""
    with torch.cuda.device(device):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        dst.copy_(src, non_blocking=True)
        end.record()
        end.synchronize()
    return start.elapsed_time(end) / 1e3


def bench_device_copy(args: argparse.Namespace) -> dict:
    """cuda:P -> cuda:D in one process: P2P across two GPUs, or a copy within one."""
    src_index, dst_index = torch.device(args.src_device).index, torch.device(args.dst_device).index
    src = torch.empty(args.ref_nbytes, dtype=torch.uint8, device=args.src_device).random_()
    dst = torch.empty_like(src, device=args.dst_device)
    s = median_s(lambda: cuda_copy_s(dst, src, src_index), args.warmup, args.reps)
    assert torch.equal(dst.cpu(), src.cpu())
    kind = "p2p" if src_index != dst_index else "same_device_copy"
    return {"kind": kind, "nbytes": args.ref_nbytes, "median_s": s,
            "GBps": gbps(args.ref_nbytes, s)}


def bench_pinned(args: argparse.Namespace) -> dict:
    src_index, dst_index = torch.device(args.src_device).index, torch.device(args.dst_device).index
    host = torch.empty(args.ref_nbytes, dtype=torch.uint8, pin_memory=True).random_()
    dev = torch.empty(args.ref_nbytes, dtype=torch.uint8, device=args.src_device)
    d2h = median_s(lambda: cuda_copy_s(host, dev, src_index), args.warmup, args.reps)
    dev = torch.empty(args.ref_nbytes, dtype=torch.uint8, device=args.dst_device)
    h2d = median_s(lambda: cuda_copy_s(dev, host, dst_index), args.warmup, args.reps)
    return {"nbytes": args.ref_nbytes, "h2d_median_s": h2d, "h2d_GBps": gbps(args.ref_nbytes, h2d),
            "d2h_median_s": d2h, "d2h_GBps": gbps(args.ref_nbytes, d2h)}


def bench_memcpy(args: argparse.Namespace) -> dict:
    """CPU: one copy_ of --ref-nbytes between two host tensors (wall clock)."""
    src = torch.empty(args.ref_nbytes, dtype=torch.uint8).random_()
    dst = torch.zeros_like(src)

    def once() -> float:
        start = time.perf_counter()
        dst.copy_(src)
        return time.perf_counter() - start

    s = median_s(once, args.warmup, args.reps)
    return {"nbytes": args.ref_nbytes, "median_s": s, "GBps": gbps(args.ref_nbytes, s),
            "threads": torch.get_num_threads()}
