"""One call of each GEMV kernel a decode layer of one sequence takes, with and without the add
+ RMSNorm split (csrc/gemv_fused.cu), on the Qwen2.5-1.5B shape's projections (random bf16),
for Nsight Compute: under `ncu` every kernel runs alone, so its duration and stall reasons
are its own, with no dependent launch overlapping its start.

    ncu --clock-control none --kernel-name regex:"gemv|rms_norm" --launch-skip 10 \\
        --section SpeedOfLight --section WarpStateStats --section LaunchStats \\
        python3 bench/gemv_ncu.py          (bash bench/device_session.sh build gemvprof)

The same 10 matching kernels run twice; `--launch-skip 10` profiles the second round (warm
clocks). A round: o_proj plain, o_proj with the add (ADD); o_proj plain again and the add +
norm kernel (`fused_add_rms_norm`), gate_up + SiLU-and-mul on its output, gate_up +
SiLU-and-mul with the norm (NORM); qkv + rotary on the normed x, then with the norm;
down_proj plain, down_proj with the add. Change the calls and the skip changes with them.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # run from a plain copy of the repo, no install
    sys.path.insert(0, str(ROOT))

from services.worker.ops import cuda_ops, fused_ops, gemv_ops  # noqa: E402

HIDDEN, INTER, HEADS, KV_HEADS, HEAD_DIM, EPS = 1536, 8960, 12, 2, 128, 1e-6


def main() -> None:
    if cuda_ops.load() is None or not hasattr(cuda_ops.load(), "gemv_add"):
        sys.exit("needs CUDA and `make kernels` with gemv_add")
    g = torch.Generator(device="cuda").manual_seed(0)

    def rand(*shape: int, scale: float = 1.0) -> torch.Tensor:
        return (torch.randn(*shape, device="cuda", generator=g) * scale).bfloat16()

    w_o, w_gu = rand(HIDDEN, HIDDEN, scale=0.02), rand(2 * INTER, HIDDEN, scale=0.02)
    w_d, w_qkv = rand(HIDDEN, INTER, scale=0.01), rand((HEADS + 2 * KV_HEADS) * HEAD_DIM, HIDDEN,
                                                      scale=0.02)
    norm_w = rand(HIDDEN, scale=0.1) + 1
    o, h, residual = rand(1, HIDDEN), rand(1, INTER), rand(1, HIDDEN)
    table = torch.rand(64, HEAD_DIM, device="cuda", generator=g)
    cos, sin = table.cos().contiguous(), table.sin().contiguous()
    caches = [torch.zeros(4, 16, KV_HEADS, HEAD_DIM, dtype=torch.bfloat16, device="cuda")
              for _ in range(2)]
    rot = (torch.tensor([5], device="cuda"), cos, sin, HEADS, KV_HEADS, HEAD_DIM, *caches,
           torch.tensor([3], device="cuda"))
    for _ in range(2):  # the second round is the one to read (warm caches, clocks)
        gemv_ops.gemv(o, w_o)
        summed = gemv_ops.linear_add(o, w_o, None, residual)
        norm = gemv_ops.Norm(summed.sums, norm_w, EPS)
        x, _ = fused_ops.fused_add_rms_norm(gemv_ops.gemv(o, w_o), residual.clone(), norm_w, EPS)
        gemv_ops.linear_silu_and_mul(x, w_gu)
        gemv_ops.linear_silu_and_mul(residual, w_gu, None, norm)
        gemv_ops.linear_rotary_store_kv(x, w_qkv, None, *rot)
        gemv_ops.linear_rotary_store_kv(residual, w_qkv, None, *rot, norm)
        gemv_ops.gemv(h, w_d)
        gemv_ops.linear_add(h, w_d, None, residual)
    torch.cuda.synchronize()
    print("gemv_ncu: every kernel ran")


if __name__ == "__main__":
    main()
