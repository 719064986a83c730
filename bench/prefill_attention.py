"""Prefill / extend attention over the paged KV cache: which route is fastest on this GPU.

Cases (Qwen2.5-1.5B's attention: 12 query / 2 KV heads, head_dim 128, bf16, block 16):
whole prompts (no cached prefix) and chunks of new tokens over a cached prefix (each new
token sees the whole prefix and the chunk up to itself: causal aligned to the bottom right).
Routes, each timed by CUDA events (median, L2 flushed, enqueue hidden by a sleep kernel):
- packed: the engine's route (ops/flash.py): gather each sequence's context from the pool
  into a packed buffer (index built once per step), then torch's varlen FlashAttention
- sdpa_<backend>: F.scaled_dot_product_attention per sequence on its gathered contiguous K/V
  (KV heads repeated for GQA), with torch's flash, cuDNN or memory-efficient backend; chunks
  over a prefix need an explicit mask, which the flash backend does not take
Every route is checked against the packed one. TFLOP/s counts 4 * q * k * head_dim * heads
for the attended (q, k) pairs (causal pairs only).

    python3 bench/prefill_attention.py --out prefill_attention.json
"""

from __future__ import annotations

import argparse
import datetime
import json
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bench.kernels import Timer  # noqa: E402
from services.worker.ops import flash  # noqa: E402
from services.worker.ops.attention import gather_kv  # noqa: E402
from services.worker.ops.attn_metadata import AttnMetadata  # noqa: E402

# (name, [(new tokens, cached prefix) per sequence])
CASES = [
    ("1x4096", [(4096, 0)]),
    ("8x512", [(512, 0)] * 8),
    ("1x1024_after_3072", [(1024, 3072)]),
    ("4x512_after_1536", [(512, 1536)] * 4),
]
BACKENDS = {"flash": SDPBackend.FLASH_ATTENTION, "cudnn": SDPBackend.CUDNN_ATTENTION,
            "efficient": SDPBackend.EFFICIENT_ATTENTION}


def make(seqs: list[tuple[int, int]], h: int = 12, kvh: int = 2, d: int = 128, bs: int = 16):
    g = torch.Generator(device="cuda").manual_seed(0)
    ctx = [n + p for n, p in seqs]
    nb = [-(-c // bs) for c in ctx]
    perm = torch.randperm(sum(nb) + 4, device="cuda", generator=g)
    tables, k = [], 0
    for n in nb:
        tables.append(perm[k:k + n])
        k += n
    width = max(nb)
    bt = torch.stack([torch.cat([t, t.new_zeros(width - len(t))]) for t in tables]).int()
    kc = torch.randn(sum(nb) + 4, bs, kvh, d, device="cuda", generator=g).bfloat16()
    vc = torch.randn_like(kc)
    q = torch.randn(sum(n for n, _ in seqs), h, d, device="cuda", generator=g).bfloat16()
    cu = [0]
    for n, _ in seqs:
        cu.append(cu[-1] + n)
    meta = AttnMetadata(
        slot_mapping=torch.zeros(0, dtype=torch.int64, device="cuda"),
        context_lens=torch.tensor(ctx, dtype=torch.int32, device="cuda"), block_tables=bt,
        cu_seqlens_q=cu, context_lens_host=ctx, num_decode_seqs=0,
        cu_seqlens_q_dev=torch.tensor(cu, dtype=torch.int32, device="cuda"),
        max_q=max(n for n, _ in seqs))
    return q, kc, vc, meta


def sdpa_route(q, kc, vc, meta, backend):
    """Per sequence: gather, repeat KV heads, one SDPA call (mask only with a prefix)."""
    h, kvh = q.shape[1], kc.shape[2]
    out = torch.empty_like(q)
    cu = meta.cu_seqlens_q
    for i, ctx in enumerate(meta.context_lens_host):
        q0, q1 = cu[i], cu[i + 1]
        k = gather_kv(kc, meta.block_tables[i:i + 1], ctx)[0].transpose(0, 1)  # [kvh, L, d]
        v = gather_kv(vc, meta.block_tables[i:i + 1], ctx)[0].transpose(0, 1)
        k = k.repeat_interleave(h // kvh, 0)[None]
        v = v.repeat_interleave(h // kvh, 0)[None]
        qi = q[q0:q1].transpose(0, 1)[None]
        lq = q1 - q0
        with sdpa_kernel(backend):
            if lq == ctx:
                o = F.scaled_dot_product_attention(qi, k, v, is_causal=True)
            else:
                rows = torch.arange(ctx - lq, ctx, device=q.device)[:, None]
                mask = torch.arange(ctx, device=q.device)[None, :] <= rows
                o = F.scaled_dot_product_attention(qi, k, v, attn_mask=mask)
        out[q0:q1] = o[0].transpose(0, 1)
    return out


def flops(seqs: list[tuple[int, int]], h: int = 12, d: int = 128) -> float:
    pairs = sum(n * p + n * (n + 1) / 2 for n, p in seqs)
    return 4 * pairs * d * h


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--reps", type=int, default=20, help="timed calls; the median is reported")
    p.add_argument("--out", help="also write the results here as JSON")
    args = p.parse_args()
    timer = Timer(3, args.reps)
    rows = []
    for name, seqs in CASES:
        q, kc, vc, meta = make(seqs)
        scale = q.shape[-1] ** -0.5
        ref = flash._packed(q, kc, vc, meta, scale)
        row = {"case": name, "seqs": seqs, "tflop": flops(seqs) / 1e12}

        def packed(q=q, kc=kc, vc=vc, meta=meta, scale=scale):
            meta.derived.clear()  # the engine builds the index once a step, for every layer
            return flash._packed(q, kc, vc, meta, scale)

        routes = {"packed": packed}
        for bname, backend in BACKENDS.items():
            routes[f"sdpa_{bname}"] = (lambda q=q, kc=kc, vc=vc, meta=meta, b=backend:
                                       sdpa_route(q, kc, vc, meta, b))
        for rname, fn in routes.items():
            try:
                diff = float((fn().float() - ref.float()).abs().max())
                t = timer.median_s(fn)
                row[rname] = {"s": t, "tflops": row["tflop"] / t, "max_abs_diff": diff}
            except (RuntimeError, TypeError, ValueError) as e:
                row[rname] = f"unavailable: {type(e).__name__}: {str(e).splitlines()[0][:150]}"
        rows.append(row)
        print(name, {k: (f"{v['s'] * 1e6:.0f}us {v['tflops']:.0f}TF/s d={v['max_abs_diff']:.3f}"
                         if isinstance(v, dict) else v) for k, v in row.items()
                     if k.startswith(("packed", "sdpa"))}, flush=True)
    result = {"bench": "prefill_attention", "date": datetime.date.today().isoformat(),
              "device": torch.cuda.get_device_name(), "torch": torch.__version__, "rows": rows}
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=2))
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
