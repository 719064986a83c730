"""Every csrc kernel once on small inputs, for compute-sanitizer (not a pytest module):

    compute-sanitizer --tool memcheck python3 tests/gpu/sanitize_case.py
    compute-sanitizer --tool racecheck python3 tests/gpu/sanitize_case.py

paged_decode runs both ways (one chunk per sequence; several chunks combined by the last
block), each with and without early_kv, bf16 and fp16, head dims 64 and 128, groups 6 and
12; then store_kv and copy_blocks, then the fused layer kernels (norms, rotary + q/k norm +
KV store, SiLU-and-mul), then the GEMV at 1, 3 and 8 rows (k not a multiple of its
256-element rounds; 2 and 4 columns per warp), and with SiLU-and-mul or rotary + KV store in
its epilogue.
Launched back to back, the kernels also run as dependent launches (csrc/launch.h) here.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from services.worker.ops import cuda_ops, fused_ops, gemv_ops  # noqa: E402


def main() -> None:
    if cuda_ops.load() is None:
        sys.exit("kernels not built (make kernels)")
    g = torch.Generator(device="cuda").manual_seed(0)
    lens = [1, 17, 300, 1100]
    for dtype in (torch.bfloat16, torch.float16):
        for head_dim, group in ((64, 6), (128, 12)):
            k = torch.randn(300, 16, 2, head_dim, device="cuda", generator=g).to(dtype)
            v = torch.randn(300, 16, 2, head_dim, device="cuda", generator=g).to(dtype)
            width = -(-max(lens) // 16)  # blocks of the longest context
            tables = torch.randperm(300, device="cuda", generator=g)[:4 * width]
            tables = tables.view(4, width).to(torch.int32).contiguous()
            q = torch.randn(4, 2 * group, head_dim, device="cuda", generator=g).to(dtype)
            ctx = torch.tensor(lens, dtype=torch.int32, device="cuda")
            for splits, early, warps in ((1, False, 4), (5, False, 4), (1, True, 4),
                                         (5, True, 4), (1, False, 8), (5, True, 8)):
                cuda_ops.paged_decode(q, k, v, tables, ctx, 0.1, num_splits=splits,
                                      min_chunk=64, early_kv=early, warps=warps)
    pool = torch.randn(3, 2, 40, 16, 2, 128, device="cuda", generator=g).bfloat16()
    key = torch.randn(5, 2, 128, device="cuda", generator=g).bfloat16()
    cuda_ops.store_kv(key, key, pool[0, 0], pool[0, 1],
                      torch.tensor([3, -1, 50, 7, 600], device="cuda"))
    cuda_ops.copy_blocks(pool, pool, [1, 2, 3], [30, 31, 39])
    x = torch.randn(7, 1536, device="cuda", generator=g).bfloat16()
    w = torch.randn(1536, device="cuda", generator=g).bfloat16()
    fused_ops.rms_norm(x, w, 1e-6)
    fused_ops.fused_add_rms_norm(x, x.clone(), w, 1e-6)
    fused_ops.silu_and_mul(torch.randn(7, 2 * 1536, device="cuda", generator=g).bfloat16())
    qkv = torch.randn(5, (12 + 2 * 2) * 128, device="cuda", generator=g).bfloat16()
    cos = torch.randn(64, 128, device="cuda", generator=g)
    norm_w = torch.randn(128, device="cuda", generator=g).bfloat16()
    for qk_norm in (None, norm_w):
        fused_ops.rotary_store_kv(qkv, torch.tensor([0, 3, 9, 63, 1], device="cuda"), cos, cos,
                                  12, 2, 128, pool[1, 0], pool[1, 1],
                                  torch.tensor([3, -1, 50, 7, 600], device="cuda"),
                                  q_norm_weight=qk_norm, k_norm_weight=qk_norm, eps=1e-6)
    for rows, n in ((1, 9000), (3, 1000), (8, 40)):
        xg = torch.randn(rows, 1000, device="cuda", generator=g).bfloat16()
        wg = torch.randn(n, 1000, device="cuda", generator=g).bfloat16()
        gemv_ops.gemv(xg, wg, torch.randn(n, device="cuda", generator=g).bfloat16())
        gemv_ops.gemv(xg, wg)
    if hasattr(cuda_ops.load(), "gemv_silu_and_mul"):  # the GEMV with an epilogue
        for rows, n in ((1, 9000), (2, 40)):
            xg = torch.randn(rows, 1000, device="cuda", generator=g).bfloat16()
            wg = torch.randn(n, 1000, device="cuda", generator=g).bfloat16()
            gemv_ops.linear_silu_and_mul(xg, wg)
            wq = torch.randn((12 + 2 * 2) * 128, 1000, device="cuda", generator=g).bfloat16()
            gemv_ops.linear_rotary_store_kv(
                xg, wq, None, torch.tensor([3, 70][:rows], device="cuda"), cos, cos, 12, 2, 128,
                pool[2, 0], pool[2, 1], torch.tensor([5, -1][:rows], device="cuda"))
        # one row of a qkv wider than a wave (48 + 2 x 8 heads): the streaming kernel
        wq = torch.randn((48 + 2 * 8) * 128, 1000, device="cuda", generator=g).bfloat16()
        kv = torch.zeros(2, 4, 16, 8, 128, device="cuda").bfloat16()
        gemv_ops.linear_rotary_store_kv(
            xg[:1], wq, None, torch.tensor([3], device="cuda"), cos, cos, 48, 8, 128, kv[0],
            kv[1], torch.tensor([5], device="cuda"))
    if hasattr(cuda_ops.load(), "gemv_add"):  # the add + norm split around the GEMVs
        for rows, n in ((1, 1000), (2, 1001)):
            residual = torch.randn(rows, n, device="cuda", generator=g).bfloat16()
            xg = torch.randn(rows, 1000, device="cuda", generator=g).bfloat16()
            wg = torch.randn(n, 1000, device="cuda", generator=g).bfloat16()
            summed = gemv_ops.linear_add(xg, wg, None, residual)
            w_norm = torch.randn(n, device="cuda", generator=g).bfloat16()
            norm = gemv_ops.Norm(summed.sums, w_norm, 1e-6)
            if rows == 1:  # a long row: 16 pieces a round, and 18 (one round, not two)
                for k in (4096, 4608):
                    xd = torch.randn(1, k, device="cuda", generator=g).bfloat16()
                    wd = torch.randn(n, k, device="cuda", generator=g).bfloat16()
                    gemv_ops.linear_add(xd, wd, None, residual)
            if n % 8 == 0:  # a normed GEMV takes k a multiple of 8
                w_in = torch.randn(9000, n, device="cuda", generator=g).bfloat16()
                gemv_ops.linear_normed(residual, w_in, None, norm)
                gemv_ops.linear_silu_and_mul(residual, w_in, None, norm)
    torch.cuda.synchronize()
    print("sanitize_case: every kernel ran")


if __name__ == "__main__":
    main()
