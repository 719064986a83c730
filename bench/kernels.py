"""Paged decode attention: our CUDA kernel against the copy bandwidth and torch's attention.

Builds the kernels if needed (csrc/build.py), then for each batch x context:
(a) copy reference: one device `copy_` of --ref-nbytes; GB/s counts bytes read + written;
    and per row a copy that moves the row's bytes (read + written), so a short call's
    launch and ramp are in the reference too (`copy_same_bytes`)
(b) ours: cuda_ops.paged_decode on a paged cache (blocks scattered at random); GB/s counts
    K/V bytes read + q + out, and its fraction of (a)
(c) sdpa: F.scaled_dot_product_attention(enable_gqa=True) on contiguous K/V of the same data
(d) varlen flash (services/worker/ops/flash.py) on the paged cache: route 'packed' (a gather
    per call, its index built once per step as in the engine) and 'paged' where torch has it
Every row is checked: ours against sdpa (max abs difference). Each time is the median of
--reps single calls after --warmup, by CUDA events, with L2 flushed before each call (a
layer's KV is not in L2 during a real decode step) and the GPU kept busy while the call is
enqueued (a sleep kernel after the flush), so host-side overhead is not counted; --splits-sweep
also times our kernel at each listed chunk count. --flush write (the default, as Triton's
do_bench) zeroes a 256 MiB buffer, which leaves the L2 full of dirty lines that the timed
call then writes back to DRAM beside its own traffic; --flush read sums that buffer instead,
so the L2 holds clean lines (as in a decode step, where it holds weights) and the timed call
moves only its own bytes.

    python3 bench/kernels.py --out kernels.json
"""

from __future__ import annotations

import argparse
import datetime
import json
import statistics
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # run from a plain copy of the repo, no install
    sys.path.insert(0, str(ROOT))

from services.worker.ops import cuda_ops, flash  # noqa: E402
from services.worker.ops.attn_metadata import AttnMetadata  # noqa: E402


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--batches", default="1,8,32,64,128", help="batch sizes, comma-separated")
    p.add_argument("--contexts", default="512,2048,8192", help="context lengths, comma-separated")
    p.add_argument("--num-heads", type=int, default=12, help="query heads")
    p.add_argument("--num-kv-heads", type=int, default=2, help="KV heads")
    p.add_argument("--head-dim", type=int, default=128, help="head dim (64 or 128)")
    p.add_argument("--block-size", type=int, default=16, help="tokens per KV block")
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16"], help="dtype")
    p.add_argument("--num-splits", type=int,
                   help="force paged_decode's chunks per sequence (default: its own choice)")
    p.add_argument("--min-chunk", type=int, default=cuda_ops.MIN_CHUNK,
                   help="paged_decode's shortest chunk in tokens (a multiple of 64)")
    p.add_argument("--splits-sweep", default="",
                   help="also time ours at these chunk counts, comma-separated (e.g. 1,2,4,8)")
    p.add_argument("--warps", type=int, choices=[4, 8],
                   help="force paged_decode's warps a block (default: its own choice)")
    p.add_argument("--warps-sweep", action="store_true",
                   help="also time ours with 4 and with 8 warps a block, each at its own "
                        "default chunk count")
    p.add_argument("--ref-nbytes", type=int, default=2**30, help="bytes of the copy reference")
    p.add_argument("--flush", choices=FLUSH_MODES, default="write",
                   help="how the L2 is flushed before each timed call (see the top)")
    p.add_argument("--warmup", type=int, default=5, help="untimed calls first")
    p.add_argument("--reps", type=int, default=30, help="timed calls; the median is reported")
    p.add_argument("--no-build", action="store_true", help="use build/kernels as it is")
    p.add_argument("--contiguous-blocks", action="store_true",
                   help="block tables in pool order (each sequence's KV contiguous) instead "
                        "of scattered at random: isolates DRAM locality")
    p.add_argument("--ours-only", action="store_true",
                   help="time our kernel only (tuning builds, profiler runs)")
    p.add_argument("--out", help="also write the results here as JSON")
    return p.parse_args(argv)


FLUSH_MODES = ("write", "read")


class Timer:
    def __init__(self, warmup: int, reps: int, flush: str = "write"):
        if flush not in FLUSH_MODES:
            raise ValueError(f"flush {flush!r}: must be one of {FLUSH_MODES}")
        self.warmup, self.reps, self.flush_mode = warmup, reps, flush
        self.flush = torch.zeros(256 * 2**20, dtype=torch.uint8, device="cuda")  # > L2

    def flush_l2(self) -> None:
        if self.flush_mode == "write":
            self.flush.zero_()
        else:  # every line read, none dirtied: a sum's only write is one scalar
            self.flush.view(torch.int32).sum(dtype=torch.int32)

    def median_s(self, fn: Callable[[], object]) -> float:
        for _ in range(self.warmup):
            fn()
        times = []
        for _ in range(self.reps):
            self.flush_l2()
            torch.cuda._sleep(100_000)  # ~50 us of GPU time: the call below queues up meanwhile
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) / 1e3)
        return statistics.median(times)

    def try_median_s(self, fn: Callable[[], object]) -> float | str:
        try:
            return self.median_s(fn)
        except (RuntimeError, TypeError, ValueError) as e:
            return f"unavailable: {type(e).__name__}: {str(e).splitlines()[0][:160]}"


def copy_reference(args: argparse.Namespace, timer: Timer) -> dict:
    src = torch.empty(args.ref_nbytes, dtype=torch.uint8, device="cuda").random_()
    dst = torch.empty_like(src)
    s = timer.median_s(lambda: dst.copy_(src))
    return {"nbytes": args.ref_nbytes, "median_s": s, "GBps": 2 * args.ref_nbytes / s / 1e9}


def copy_same_bytes_s(timer: Timer, nbytes: int) -> float:
    """One device copy that reads nbytes / 2 and writes as many."""
    src = torch.empty(nbytes // 2, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    return timer.median_s(lambda: dst.copy_(src))


def make_case(args: argparse.Namespace, batch: int, context: int, seed: int = 0):
    dtype = getattr(torch, args.dtype)
    h, kvh, d, bs = args.num_heads, args.num_kv_heads, args.head_dim, args.block_size
    g = torch.Generator(device="cuda").manual_seed(seed)
    blocks_per_seq = -(-context // bs)
    num_blocks = batch * blocks_per_seq
    in_order = getattr(args, "contiguous_blocks", False)  # other benches pass their own args
    tables = (torch.arange(num_blocks, device="cuda") if in_order else
              torch.randperm(num_blocks, device="cuda", generator=g)).to(torch.int32)
    tables = tables.view(batch, blocks_per_seq)
    k_cache = torch.randn(num_blocks, bs, kvh, d, device="cuda", generator=g).to(dtype)
    v_cache = torch.randn(num_blocks, bs, kvh, d, device="cuda", generator=g).to(dtype)
    q = torch.randn(batch, h, d, device="cuda", generator=g).to(dtype)
    lens = torch.full((batch,), context, dtype=torch.int32, device="cuda")
    cu = list(range(batch + 1))
    meta = AttnMetadata(
        slot_mapping=torch.zeros(0, dtype=torch.int64, device="cuda"), context_lens=lens,
        block_tables=tables, cu_seqlens_q=cu, context_lens_host=[context] * batch,
        num_decode_seqs=batch, cu_seqlens_q_dev=torch.tensor(cu, dtype=torch.int32,
                                                             device="cuda"),
        max_q=1,
    )
    return q, k_cache, v_cache, tables, lens, meta


def bench_row(args: argparse.Namespace, timer: Timer, batch: int, context: int,
              copy_gbps: float) -> dict:
    q, k_cache, v_cache, tables, lens, meta = make_case(args, batch, context)
    scale = args.head_dim**-0.5
    warps = args.warps or cuda_ops.choose_warps(batch, args.num_kv_heads, q.device)

    def default_splits(w: int) -> int:
        return args.num_splits or cuda_ops.choose_num_splits(batch, args.num_kv_heads, q.device,
                                                             args.head_dim, w)

    splits = default_splits(warps)

    def ours_fn(n: int = splits, w: int = warps):
        return lambda: cuda_ops.paged_decode(q, k_cache, v_cache, tables, lens, scale,
                                             num_splits=n, min_chunk=args.min_chunk, warps=w)

    ours = ours_fn()()
    t_ours = timer.median_s(ours_fn())
    elem = q.element_size()
    nbytes = 2 * batch * context * args.num_kv_heads * args.head_dim * elem + 2 * q.nbytes
    row = {
        "batch": batch, "context": context, "num_splits": splits, "warps": warps,
        "min_chunk": args.min_chunk,
        "nbytes": nbytes, "ours_s": t_ours, "ours_GBps": nbytes / t_ours / 1e9,
        "ours_frac_of_copy": nbytes / t_ours / 1e9 / copy_gbps,
    }
    t_copy = copy_same_bytes_s(timer, nbytes)
    row["copy_same_bytes_GBps"] = nbytes / t_copy / 1e9
    row["ours_frac_of_copy_same_bytes"] = t_copy / t_ours
    if args.splits_sweep:
        row["splits_sweep_s"] = {n: timer.median_s(ours_fn(n))
                                 for n in (int(x) for x in args.splits_sweep.split(","))}
    if args.warps_sweep:
        row["warps_sweep"] = {w: {"num_splits": default_splits(w),
                                  "s": timer.median_s(ours_fn(default_splits(w), w))}
                              for w in (4, 8)}
    if args.ours_only:
        row["check"] = True
        return row
    # sdpa on contiguous K/V of the same data: [batch, kv_heads, context, head_dim]
    k = k_cache[tables.long()].flatten(1, 2)[:, :context].transpose(1, 2).contiguous()
    v = v_cache[tables.long()].flatten(1, 2)[:, :context].transpose(1, 2).contiguous()
    q4 = q[:, :, None, :]
    ref = F.scaled_dot_product_attention(q4, k, v, scale=scale, enable_gqa=True)[:, :, 0]
    row["max_abs_diff_vs_sdpa"] = float((ours.float() - ref.float()).abs().max())
    row["check"] = row["max_abs_diff_vs_sdpa"] < 2e-2
    row["sdpa_s"] = timer.try_median_s(
        lambda: F.scaled_dot_product_attention(q4, k, v, scale=scale, enable_gqa=True))
    for route in ("packed", "paged"):
        impl = flash._IMPLS[route]
        row[f"varlen_{route}_s"] = (
            "unavailable: torch has no varlen_attn" if flash.varlen_attn is None
            else timer.try_median_s(lambda impl=impl: impl(q, k_cache, v_cache, meta, scale)))
    for key in ("sdpa_s", "varlen_packed_s", "varlen_paged_s"):
        if isinstance(row[key], float):
            row[key.replace("_s", "_over_ours")] = row[key] / t_ours
    return row


def fmt(x: object) -> str:
    return f"{x * 1e6:9.1f}" if isinstance(x, float) else f"{'n/a':>9}"


def main() -> None:
    args = parse_args()
    if not torch.cuda.is_available():
        sys.exit("bench/kernels.py needs a CUDA device")
    if not args.no_build:
        subprocess.run([sys.executable, str(ROOT / "csrc" / "build.py")], check=True)
    if cuda_ops.load() is None:
        sys.exit(f"no kernels in {cuda_ops.BUILD_DIR}: run `make kernels`")
    timer = Timer(args.warmup, args.reps, args.flush)
    copy = copy_reference(args, timer)
    print(f"copy reference: {copy['GBps']:.1f} GB/s (read + write, {args.ref_nbytes} bytes; "
          f"L2 flushed by a {args.flush})")
    print(f"{'batch':>5} {'ctx':>6} {'split':>5} {'warps':>5} {'ours us':>9} {'GB/s':>7} "
          f"{'of copy':>7} {'of same':>7} {'sdpa us':>9} {'packed us':>9} {'paged us':>9} "
          f"{'diff':>8}")
    rows = []
    for batch in [int(b) for b in args.batches.split(",")]:
        for context in [int(c) for c in args.contexts.split(",")]:
            r = bench_row(args, timer, batch, context, copy["GBps"])
            rows.append(r)
            diff = r.get("max_abs_diff_vs_sdpa")
            print(f"{batch:5d} {context:6d} {r['num_splits']:5d} {r['warps']:5d} "
                  f"{fmt(r['ours_s'])} {r['ours_GBps']:7.1f} {r['ours_frac_of_copy']:7.2f} "
                  f"{r['ours_frac_of_copy_same_bytes']:7.2f} "
                  f"{fmt(r.get('sdpa_s'))} {fmt(r.get('varlen_packed_s'))} "
                  f"{fmt(r.get('varlen_paged_s'))} "
                  f"{diff if diff is None else f'{diff:8.4f}'}"
                  f"{'' if r['check'] else '  CHECK FAILED'}")
            if "splits_sweep_s" in r:
                print("      splits: " + "  ".join(f"{n}:{t * 1e6:.1f}us"
                                                 for n, t in r["splits_sweep_s"].items()))
            if "warps_sweep" in r:
                print("      warps: " + "  ".join(
                    f"{w} ({v['num_splits']} chunks): {v['s'] * 1e6:.1f}us"
                    for w, v in r["warps_sweep"].items()))
            torch.cuda.empty_cache()
    result = {
        "bench": "kernels", "date": datetime.date.today().isoformat(),
        "device": torch.cuda.get_device_name(), "torch": torch.__version__,
        "args": {k: v for k, v in vars(args).items() if k != "out"},
        "copy_reference": copy, "rows": rows,
    }
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=2))
        print(f"wrote {args.out}")
    if not all(r["check"] for r in rows):
        sys.exit("some rows differ from sdpa by 2e-2 or more")


if __name__ == "__main__":
    main()
