"""Where a decode step's GPU time goes: every kernel of one step by name and kind, and each
linear layer's GEMV alone against the copy bandwidth.

For a batch x context of a real model shape (random weights):
- the step's kernels, from torch.profiler over --reps eager steps and --reps CUDA-graph
  replays: time per step by kernel name and by kind (gemm, attention, our fused kernels, other),
  their count, and the replay's GPU time against the sum of its kernels (the gaps). With
  dependent launches (csrc/launch.h) a kernel's span includes its wait for the one before, so
  each kernel is also charged only the time by which it moved the end of the step on
  (`critical_us`: its end past every earlier kernel's end; `idle_us` where nothing ran);
- the fused GEMVs (csrc/gemv_fused.cu) against the kernels they replace, alone, as below;
- every distinct linear shape of a layer, at the step's row count, timed alone inside a CUDA
  graph of --gemv-calls back-to-back calls (launch gaps as in the step): us per call and GB/s of
  weight reads, as a fraction of a device copy's bandwidth measured in the same run.

    python3 bench/decode_profile.py --out decode_profile.json
"""

from __future__ import annotations

import argparse
import datetime
import json
import sys
import tempfile
from collections import defaultdict
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # run from a plain copy of the repo, no install
    sys.path.insert(0, str(ROOT))

from bench.decode_step import copy_gbps, decode_batch, median_ms, weight_nbytes  # noqa: E402
from services.worker.engine import LLM  # noqa: E402
from services.worker.models.random_model import write_random_model  # noqa: E402
from services.worker.ops import cuda_ops, gemv_ops  # noqa: E402

# first match wins: our GEMV is "gemm" (its name also holds "nanopd")
KINDS = [("attention", ("paged_decode",)),
         ("gemm", ("gemm", "gemv", "cutlass", "xmma", "sm90", "splitk", "cublas", "nvjet")),
         ("fused", ("nanopd", "fused", "rms", "rotary", "silu"))]


def kind_of(name: str) -> str:
    low = name.lower()
    for kind, keys in KINDS:
        if any(k in low for k in keys):
            return kind
    return "other"


def decode_engine(tmp: Path, shape: str, batch: int, context: int) -> tuple[LLM, list]:
    """An engine on a random bf16 model of `shape` (written under tmp) with KV blocks for
    `batch` sequences of `context` tokens, and such a decode batch (`decode_batch`)."""
    model_dir = tmp / shape
    write_random_model(model_dir, shape, dtype="bfloat16", device="cuda")
    need = batch * -(-context // 16) + 64
    llm = LLM(model=str(model_dir), device="cuda:0", dtype="bfloat16", num_kv_blocks=need,
              max_num_seqs=max(batch, 8), max_model_len=context + 16)
    spec = decode_batch(llm.engine.runner, batch, context, torch.Generator().manual_seed(0))
    return llm, spec


def profile_kernels(fn, reps: int) -> dict:
    """Per call of fn: GPU us by kernel name (with its count) and by kind."""
    from torch.profiler import ProfilerActivity, profile

    fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(reps):
            fn()
        torch.cuda.synchronize()
    by_name: dict[str, list[float]] = defaultdict(lambda: [0.0, 0])
    spans = []
    for ev in prof.events():
        if ev.device_type == torch.autograd.DeviceType.CUDA and ev.device_time_total > 0:
            by_name[ev.name][0] += ev.device_time_total / reps
            by_name[ev.name][1] += 1 / reps
            spans.append((ev.time_range.start, ev.time_range.end, ev.name))
    critical: dict[str, float] = defaultdict(float)
    idle, last_end = 0.0, None
    for start, end, name in sorted(spans):
        if last_end is not None:
            idle += max(0.0, start - last_end) / reps
        if last_end is None or end > last_end:
            critical[name] += (end - max(start, last_end or start)) / reps
            last_end = end
    names = sorted(by_name.items(), key=lambda kv: -kv[1][0])
    by_kind: dict[str, float] = defaultdict(float)
    for name, (us, _) in names:
        by_kind[kind_of(name)] += us
    critical_by_kind: dict[str, float] = defaultdict(float)
    for name, us in critical.items():
        critical_by_kind[kind_of(name)] += us
    return {"kernel_us_per_step": sum(us for _, (us, _) in names),
            "launches_per_step": sum(n for _, (_, n) in names),
            "by_kind_us": dict(by_kind), "critical_by_kind_us": dict(critical_by_kind),
            "idle_us": idle,
            "by_name": [{"name": n[:160], "us": us, "count": c, "kind": kind_of(n),
                         "critical_us": critical.get(n, 0.0)}
                        for n, (us, c) in names[:40]]}


def linear_shapes(model: torch.nn.Module) -> list[tuple[str, int, int]]:
    """(name, out, in) of each distinct linear of layer 0, and lm_head."""
    seen, shapes = set(), []
    for name, mod in model.named_modules():
        if isinstance(mod, torch.nn.Linear) and (".layers." not in name
                                                  or ".layers.0." in name):
            key = tuple(mod.weight.shape)
            if key not in seen:
                seen.add(key)
                shapes.append((name, *key))
    return shapes


def graph_us_per_call(fn, calls: int) -> float:
    """GPU us per call of fn, captured `calls` times back to back in one CUDA graph."""
    fn()
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        for _ in range(calls):
            fn()
    return median_ms(g.replay, 10, events=True) * 1e3 / calls


def time_linears(shapes, rows_list: list[int], calls: int, gbps: float, dtype) -> list[dict]:
    """Each linear shape at each row count: cuBLAS (F.linear) and, when built, our GEMV."""
    impls = {"cublas": torch.nn.functional.linear}
    if cuda_ops.load() is not None and hasattr(cuda_ops.load(), "gemv"):
        impls["ours"] = gemv_ops.gemv
    out = []
    for name, n_out, n_in in shapes:
        w = torch.randn(n_out, n_in, device="cuda", dtype=dtype) * 0.02
        b = torch.randn(n_out, device="cuda", dtype=dtype) * 0.02
        nbytes = w.numel() * w.element_size()
        for rows in rows_list:
            x = torch.randn(rows, n_in, device="cuda", dtype=dtype)
            for bias in (None, b):
                row = {"layer": name, "out": n_out, "in": n_in, "rows": rows,
                       "bias": bias is not None}
                for impl, fn in impls.items():
                    if impl == "ours" and rows > gemv_ops.GEMV_MAX_ROWS:
                        continue
                    us = graph_us_per_call(lambda fn=fn, x=x, w=w, bias=bias: fn(x, w, bias),
                                           calls)
                    row[f"{impl}_us"] = us
                    row[f"{impl}_fraction_of_copy"] = nbytes / us / 1e3 / gbps
                if "ours_us" in row:
                    row["ours_speedup"] = row["cublas_us"] / row["ours_us"]
                out.append(row)
    return out


def time_fused(model: torch.nn.Module, rows_list: list[int], calls: int) -> list[dict]:
    """Layer 0's fused GEMVs alone against the two kernels each replaces, in a CUDA graph of
    `calls` back-to-back calls: gate_up_proj with SiLU-and-mul, qkv_proj with rotary + KV
    store (models without q/k norm)."""
    from services.worker.ops import fused_ops

    if not hasattr(cuda_ops.load(), "gemv_silu_and_mul"):
        return []
    attn, up, out = model.model.layers[0].self_attn, model.model.layers[0].mlp.gate_up_proj, []
    lin = attn.qkv_proj
    for rows in rows_list:
        x = torch.randn(rows, up.weight.shape[1], device="cuda", dtype=up.weight.dtype)
        pos = torch.arange(rows, device="cuda")
        heads = (attn.num_heads, attn.num_kv_heads, attn.head_dim)
        rot = (attn.rotary.cos, attn.rotary.sin, *heads, attn.k_cache, attn.v_cache, pos)
        cases = [("gate_up_proj+silu",
                  lambda x=x: fused_ops.silu_and_mul(gemv_ops.gemv(x, up.weight, up.bias)),
                  lambda x=x: gemv_ops.linear_silu_and_mul(x, up.weight, up.bias))]
        if not attn.qk_norm:
            cases.append(("qkv_proj+rotary",
                          lambda x=x, pos=pos, rot=rot: fused_ops.rotary_store_kv(
                              gemv_ops.gemv(x, lin.weight, lin.bias), pos, *rot),
                          lambda x=x, pos=pos, rot=rot: gemv_ops.linear_rotary_store_kv(
                              x, lin.weight, lin.bias, pos, *rot)))
        if rows <= 2 and hasattr(cuda_ops.load(), "gemv_add"):
            cases.append(_add_norm_case(model, rows))
        for name, unfused, fused in cases:
            row = {"layer": name, "rows": rows, "unfused_us": graph_us_per_call(unfused, calls),
                   "fused_us": graph_us_per_call(fused, calls)}
            row["speedup"] = row["unfused_us"] / row["fused_us"]
            out.append(row)
    return out


def _add_norm_case(model: torch.nn.Module, rows: int) -> tuple:
    """o_proj, the post-attention add + RMSNorm and gate_up + SiLU-and-mul of layer 0: the
    GEMV, fused_add_rms_norm and the fused gate_up, against the add in o_proj's epilogue and
    the norm in gate_up's prologue."""
    from services.worker.ops import fused_ops

    layer = model.model.layers[0]
    o_w, up, norm = layer.self_attn.o_proj.weight, layer.mlp.gate_up_proj, \
        layer.post_attention_layernorm
    o = torch.randn(rows, o_w.shape[1], device="cuda", dtype=o_w.dtype)
    residual = torch.randn(rows, o_w.shape[0], device="cuda", dtype=o_w.dtype)

    def unfused() -> None:
        x, _ = fused_ops.fused_add_rms_norm(gemv_ops.gemv(o, o_w), residual, norm.weight,
                                            norm.eps)
        gemv_ops.linear_silu_and_mul(x, up.weight, up.bias)

    def fused() -> None:
        summed = gemv_ops.linear_add(o, o_w, None, residual)
        gemv_ops.linear_silu_and_mul(residual, up.weight, up.bias,
                                     gemv_ops.Norm(summed.sums, norm.weight, norm.eps))

    return "o_proj+add_norm+gate_up_silu", unfused, fused


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--shape", default="qwen2.5-1.5b")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--context", type=int, default=512)
    p.add_argument("--reps", type=int, default=10)
    p.add_argument("--gemv-calls", type=int, default=50)
    p.add_argument("--gemv-rows", default="1,2,4,8,16", help="row counts of the linears alone")
    p.add_argument("--out")
    args = p.parse_args()
    gbps = copy_gbps()
    with tempfile.TemporaryDirectory() as tmp:
        llm, spec = decode_engine(Path(tmp), args.shape, args.batch, args.context)
        runner = llm.engine.runner
        rows = list(range(args.batch))
        graphs = runner.graphs
        result = {"bench": "decode_profile", "date": datetime.date.today().isoformat(),
                  "device": torch.cuda.get_device_name(), "torch": torch.__version__,
                  "shape": args.shape, "batch": args.batch, "context": args.context,
                  "copy_GBps": gbps, "weight_nbytes": weight_nbytes(runner.model)}
        result["floor_ms"] = result["weight_nbytes"] / gbps / 1e6
        runner.run(spec, rows)
        g = graphs.graphs[graphs.padded_size(args.batch)]
        result["graph_gpu_ms"] = median_ms(g.replay, 20, events=True)
        result["graph"] = profile_kernels(g.replay, args.reps)
        runner.graphs = None
        result["eager"] = profile_kernels(lambda: runner.run(spec, rows), args.reps)
        runner.graphs = graphs
        result["fused"] = time_fused(runner.model, [1, 2], args.gemv_calls)
        result["linears"] = time_linears(linear_shapes(runner.model),
                                         [int(r) for r in args.gemv_rows.split(",")],
                                         args.gemv_calls, gbps, torch.bfloat16)
    for mode in ("graph", "eager"):
        r = result[mode]
        print(f"{mode}: {r['kernel_us_per_step']:.1f} us of kernels, "
              f"{r['launches_per_step']:.0f} launches; by kind {r['by_kind_us']}; on the "
              f"critical path {r['critical_by_kind_us']}, idle {r['idle_us']:.1f} us")
        for row in r["by_name"][:15]:
            print(f"  {row['us']:8.1f} us (critical {row['critical_us']:7.1f}) "
                  f"x{row['count']:5.0f}  {row['kind']:9s} {row['name'][:80]}")
    print(f"graph replay {result['graph_gpu_ms']:.3f} ms, floor {result['floor_ms']:.3f} ms")
    for row in result["fused"]:
        print(f"  fused {row['layer']:17s} rows {row['rows']}: unfused {row['unfused_us']:6.2f} "
              f"us, fused {row['fused_us']:6.2f} us, x{row['speedup']:.2f}")
    for row in result["linears"]:
        ours = (f"ours {row['ours_us']:7.2f} us {row['ours_fraction_of_copy']:.2f}  "
                f"x{row['ours_speedup']:.2f}" if "ours_us" in row else "")
        print(f"  {row['layer'][-24:]:24s} {row['out']:6d}x{row['in']:<6d} rows {row['rows']:2d} "
              f"bias={row['bias']!s:5s} cublas {row['cublas_us']:7.2f} us "
              f"{row['cublas_fraction_of_copy']:.2f} of copy  {ours}")
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
