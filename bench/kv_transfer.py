"""KV transfer bandwidth: the cuda_ipc and shm_ring transports against their hardware limits.

A prefill process on cuda:P and a decode process on cuda:D (`--devices P,D`; default 0,1
with two GPUs, 0,0 with one):
(a) reference for cuda_ipc: P != D: one plain `copy_` of --ref-nbytes from cuda:P to cuda:D
    in one process (P2P); P == D: the same `copy_` within cuda:P (a same-device copy)
(b) cuda_ipc: the decode process pulls N blocks out of the prefill process's pool; GB/s of
    the pull (`recv`) and end to end, each as a fraction of (a); once with torch's copies,
    once with csrc's copy_blocks kernel (`cuda_ipc+kernel`, when `make kernels` has built it)
(c) pinned: one --ref-nbytes copy cuda:P -> pinned host (D2H) and one pinned host -> cuda:D
    (H2D); their serial sum is the reference of shm_ring
(d) shm_ring: the prefill process gathers N blocks into the ring (`send`), the decode process
    copies them into its pool (`recv`), piece by piece as they land (pipelined); and each
    of its copies alone, in one process (`shm_ring_parts`, bench/kv_ring_parts.py)

End to end = from the start of the producer's `send` until the consumer's `recv` returned
with the data in place, on one clock (CLOCK_MONOTONIC is system-wide), including the pipe
that carries the handle. The pool is shaped like Qwen2.5-1.5B's (28 layers, 2 KV heads,
head_dim 128, bf16, blocks of 16 tokens); N comes from --tokens. GB = 1e9 bytes; each figure
is the median of --reps runs after --warmup; every transport row is checked bitwise (a
digest of the blocks on each side). Needs torch (and numpy, for the digests) only.

    python bench/kv_transfer.py --out kv_transfer.json     # 2 GPUs (0 -> 1), or 1 (0 -> 0)
    python bench/kv_transfer.py --devices 0,0              # both processes on cuda:0
    python bench/kv_transfer.py --device cpu               # shm_ring between CPU pools only

On the CPU the reference is one host memcpy of --ref-nbytes (the ring copies each byte twice).
"""

from __future__ import annotations

import argparse
import datetime
import hashlib
import json
import multiprocessing as mp
import platform
import random
import statistics
import sys
import time
from multiprocessing.connection import Connection
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # run from a plain copy of the repo, no install
    sys.path.insert(0, str(ROOT))

from bench.kv_references import bench_device_copy, bench_memcpy, bench_pinned, gbps  # noqa: E402
from bench.kv_ring_parts import ring_parts  # noqa: E402
from common.transport import make_transport  # noqa: E402


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", choices=["cuda", "cpu"],
                   default="cuda" if torch.cuda.is_available() else "cpu",
                   help="cuda: prefill and decode on the GPUs of --devices; "
                        "cpu: shm_ring between two CPU pools")
    p.add_argument("--devices",
                   help="P,D: prefill process on cuda:P, decode process on cuda:D "
                        "(default 0,1 with two or more GPUs, 0,0 with one)")
    p.add_argument("--tokens", default="2048,8192", help="prompt lengths to move, comma-separated")
    p.add_argument("--num-layers", type=int, default=28, help="layers of the pool")
    p.add_argument("--num-kv-heads", type=int, default=2, help="KV heads of the pool")
    p.add_argument("--head-dim", type=int, default=128, help="head dim of the pool")
    p.add_argument("--block-size", type=int, default=16, help="tokens per KV block")
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"],
                   help="pool dtype")
    p.add_argument("--num-blocks", type=int,
                   help="blocks in each pool (default 4096 on GPU, 1024 on CPU)")
    p.add_argument("--ref-nbytes", type=int, default=512 * 2**20,
                   help="bytes of the reference copies (a) and (c)")
    p.add_argument("--ipc-staged-mib", type=int, default=256,
                   help="cuda_ipc: most MiB gathered per copy (more blocks: several copies)")
    p.add_argument("--ring-piece-mib", type=float, default=4,
                   help="shm_ring: MiB per piece (the consumer copies a piece once it landed)")
    p.add_argument("--cpu-threads", type=int, default=1,
                   help="torch threads per process with --device cpu (the two processes "
                        "share the cores, as workers do)")
    p.add_argument("--warmup", type=int, default=3, help="untimed runs first")
    p.add_argument("--reps", type=int, default=10, help="timed runs; the median is reported")
    p.add_argument("--out", help="also write the results here as JSON")
    args = p.parse_args(argv)
    args.block_counts = [-(-int(t) // args.block_size) for t in args.tokens.split(",")]
    args.num_blocks = args.num_blocks or (4096 if args.device == "cuda" else 1024)
    if max(args.block_counts) > args.num_blocks:
        p.error(f"--tokens needs {max(args.block_counts)} blocks; the pool has {args.num_blocks}")
    args.src_device = args.dst_device = "cpu"
    if args.device == "cuda":
        num_gpus = torch.cuda.device_count()
        if num_gpus == 0:
            p.error("--device cuda but no GPU is visible; use --device cpu")
        spec = args.devices or ("0,1" if num_gpus > 1 else "0,0")
        try:
            src, dst = (int(x) for x in spec.split(","))
        except ValueError:
            p.error(f"--devices {spec!r}: expected two GPU indices, e.g. 0,1 or 0,0")
        if not (0 <= src < num_gpus and 0 <= dst < num_gpus):
            p.error(f"--devices {spec!r}: this machine has GPUs 0..{num_gpus - 1}")
        args.src_device, args.dst_device = f"cuda:{src}", f"cuda:{dst}"
    elif args.devices:
        p.error("--devices needs --device cuda")
    return args


# one prefill and one decode process per transport
def make_pool(args: argparse.Namespace, device: str, fill: bool) -> torch.Tensor:
    shape = (args.num_layers, 2, args.num_blocks, args.block_size, args.num_kv_heads,
             args.head_dim)
    pool = torch.empty(shape, dtype=getattr(torch, args.dtype), device=device)
    if fill:
        pool.view(torch.uint8).random_()
    else:
        pool.zero_()  # touch every page now, not inside a timed recv
    if pool.is_cuda:
        torch.cuda.synchronize(pool.device)
    return pool


def digest(pool: torch.Tensor, block_ids: list[int]) -> str:
    data = pool[:, :, block_ids].contiguous().view(torch.uint8).cpu().numpy()
    return hashlib.blake2b(data.tobytes(), digest_size=16).hexdigest()


def transport_kw(args: argparse.Namespace, name: str) -> dict:
    """`name` is a transport, or cuda_ipc+kernel: cuda_ipc pulling with csrc's copy_blocks."""
    if name == "shm_ring":
        return {"num_slots": max(args.block_counts),
                "piece_nbytes": int(args.ring_piece_mib * 2**20)}
    kw = {"max_staged_nbytes": args.ipc_staged_mib * 2**20}
    if name == "cuda_ipc+kernel":
        from services.worker.ops import cuda_ops
        kw["copy_blocks"] = cuda_ops.copy_blocks
    return kw


def _set_device(args: argparse.Namespace, device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.set_device(torch.device(device))
    else:
        torch.set_num_threads(args.cpu_threads)


def _prefill_main(args: argparse.Namespace, name: str, device: str, conn: Connection) -> None:
    _set_device(args, device)
    pool = make_pool(args, device, fill=True)
    t = make_transport(name.split("+")[0], pool, worker="bench-prefill",
                       **transport_kw(args, name))
    conn.send(t.export())
    while True:
        cmd, *rest = conn.recv()
        if cmd == "send":
            start = time.perf_counter()
            handle = t.send(*rest)
            if handle is None:
                raise RuntimeError("the shm ring is full; the bench releases every handle")
            issued = time.perf_counter()
            if t.recv_waits_for_send:  # pipelined: the consumer starts on the first pieces
                conn.send((handle, start, issued - start))
                t.wait_sent(handle)
            else:
                t.wait_sent(handle)
                conn.send((handle, start, issued - start))
            conn.send(time.perf_counter() - start)  # the producer's copies are done
        elif cmd == "release":
            t.release(rest[0])
        elif cmd == "digest":
            conn.send(digest(pool, rest[0]))
        else:
            t.close()
            conn.send("stopped")
            return


def _decode_main(args: argparse.Namespace, name: str, device: str, conn: Connection,
                 results: mp.Queue) -> None:
    try:
        _set_device(args, device)
        pool = make_pool(args, device, fill=False)
        t = make_transport(name.split("+")[0], pool, worker="bench-decode",
                           **transport_kw(args, name))
        export, rng, rows = conn.recv(), random.Random(0), []
        for n, layout in [(n, lay) for n in args.block_counts
                          for lay in ("consecutive", "scattered")]:
            send_s, done_s, recv_s, e2e_s = [], [], [], []
            for rep in range(args.warmup + args.reps):
                if layout == "scattered":  # a long-running pool's free list
                    src = rng.sample(range(args.num_blocks), n)
                    dst = rng.sample(range(args.num_blocks), n)
                else:  # a fresh pool allocates in order
                    a, b = (rng.randrange(args.num_blocks - n + 1) for _ in range(2))
                    src, dst = list(range(a, a + n)), list(range(b, b + n))
                conn.send(("send", f"r{n}_{rep}", src))
                handle, sent_at, issue_s = conn.recv()
                start = time.perf_counter()
                t.recv(export, handle, dst)
                end = time.perf_counter()
                producer_s = conn.recv()
                if rep >= args.warmup:
                    send_s.append(issue_s)
                    done_s.append(producer_s)
                    recv_s.append(end - start)
                    e2e_s.append(end - sent_at)
                conn.send(("release", handle))
            conn.send(("digest", src))
            nbytes = n * t.block_nbytes
            med = {k: statistics.median(v) for k, v in (
                ("send", send_s), ("producer_done", done_s), ("recv", recv_s),
                ("end_to_end", e2e_s))}
            rows.append({
                "num_tokens": n * args.block_size, "num_blocks": n, "layout": layout,
                "nbytes": nbytes,
                **{f"{k}_median_s": v for k, v in med.items()},
                "producer_GBps": gbps(nbytes, med["producer_done"]),
                "recv_GBps": gbps(nbytes, med["recv"]),
                "end_to_end_GBps": gbps(nbytes, med["end_to_end"]),
                "bitwise_equal": conn.recv() == digest(pool, dst),
            })
        t.close()
        conn.send(("stop",))
        conn.recv()
        results.put(rows)
    except BaseException as e:
        results.put(f"{type(e).__name__}: {e}")
        raise


def bench_transport(args: argparse.Namespace, name: str, src_device: str,
                    dst_device: str) -> list[dict]:
    ctx = mp.get_context("spawn")
    prefill_conn, decode_conn = ctx.Pipe()
    results = ctx.Queue()
    procs = [ctx.Process(target=_prefill_main, args=(args, name, src_device, prefill_conn)),
             ctx.Process(target=_decode_main,
                         args=(args, name, dst_device, decode_conn, results))]
    for p in procs:
        p.start()
    prefill_conn.close()  # the children hold their ends: a dead peer means EOF, not a hang
    decode_conn.close()
    try:
        rows = results.get(timeout=600)
    finally:
        for p in procs:
            p.join(timeout=60)
            if p.is_alive():
                p.kill()
    if isinstance(rows, str):
        raise RuntimeError(f"{name} bench failed in the decode process: {rows}")
    return rows


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    src_device, dst_device = args.src_device, args.dst_device
    on_gpu = src_device != "cpu"
    block_nbytes = (2 * args.num_layers * args.block_size * args.num_kv_heads * args.head_dim
                    * torch.empty(0, dtype=getattr(torch, args.dtype)).element_size())
    out: dict = {
        "date": datetime.date.today().isoformat(), "host": platform.node(),
        "python": platform.python_version(), "torch": torch.__version__,
        "src_device": src_device, "dst_device": dst_device,
        "device_names": [torch.cuda.get_device_name(i)
                         for i in range(torch.cuda.device_count() if on_gpu else 0)],
        "config": {k: v for k, v in vars(args).items() if k != "out"} | {
            "block_nbytes": block_nbytes},
        "notes": "GB = 1e9 bytes; references timed by CUDA events around one copy_; "
                 "transports end to end by wall clock, from the start of send on the "
                 "producer to the return of recv (data in place) on the consumer",
    }
    if on_gpu:
        ref = out["device_copy"] = bench_device_copy(args)
        out["pinned"] = bench_pinned(args)
        out["shm_ring_parts"] = ring_parts(
            make_pool(args, src_device, fill=True), make_pool(args, dst_device, fill=False),
            args.block_counts, args.warmup, args.reps)
        torch.cuda.empty_cache()
        from services.worker.ops import cuda_ops
        ipc = ["cuda_ipc"] + (["cuda_ipc+kernel"] if cuda_ops.load() is not None else [])
        for name in ipc:  # torch copies, then csrc's copy_blocks (one launch) if built
            out[name] = bench_transport(args, name, src_device, dst_device)
            for row in out[name]:  # the pull alone (recv), as before; and end to end
                row[f"fraction_of_{ref['kind']}"] = row["recv_GBps"] / ref["GBps"]
                row[f"end_to_end_fraction_of_{ref['kind']}"] = (
                    row["end_to_end_GBps"] / ref["GBps"])
    else:
        torch.set_num_threads(args.cpu_threads)
        out["memcpy"] = bench_memcpy(args)
    out["shm_ring"] = bench_transport(args, "shm_ring", src_device, dst_device)
    if "memcpy" in out:  # the ring copies each byte twice: producer in, consumer out
        for row in out["shm_ring"]:
            row["end_to_end_fraction_of_two_memcpys"] = (
                row["end_to_end_GBps"] / (out["memcpy"]["GBps"] / 2))
    if "pinned" in out:
        pinned = out["pinned"]
        serial = 1 / (1 / pinned["d2h_GBps"] + 1 / pinned["h2d_GBps"])
        for row in out["shm_ring"]:
            row["producer_fraction_of_d2h"] = row["producer_GBps"] / pinned["d2h_GBps"]
            row["end_to_end_fraction_of_d2h_then_h2d"] = row["end_to_end_GBps"] / serial
    text = json.dumps(out, indent=2)
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n")
    return out


if __name__ == "__main__":
    main()
