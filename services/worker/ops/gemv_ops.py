"""Linear layers of decode-sized batches through csrc's GEMV (csrc/gemv.cu), when built.

A decode step of 1-8 sequences multiplies that many rows by every weight: the step streams
the weights, and cuBLAS left much of the bandwidth unused on small layers there
(docs/kernels.md, "Linear layers"). `linear` is a drop-in `F.linear` that takes the kernel
for CUDA fp16/bf16 inputs of 1 to LINEAR_MAX_ROWS rows when the extension is built, unless
`NANOPD_GEMV=0`; F.linear (cuBLAS) otherwise, which is also its torch reference. Nothing
here reads a device value or syncs: every call can be captured in a CUDA graph.

Also the GEMV with the next kernel in its epilogue, in one kernel (csrc/gemv_fused.cu):
`linear_silu_and_mul` (gate_up_proj) and `linear_rotary_store_kv` (qkv_proj without q/k norm),
bitwise `gemv` then fused_ops' kernel; the model takes them for decode steps of one sequence
unless `NANOPD_GEMV_FUSE=0` (`fuse_enabled`).
"""

from __future__ import annotations

import os

import torch
import torch.nn.functional as F

from services.worker.ops import cuda_ops, fused_ops

GEMV_MAX_ROWS = 8  # NANOPD_GEMV_MAX_ROWS in csrc/gemv.h
# `linear` takes the kernel up to this many rows: where it beat cuBLAS on an H200
# (bench/decode_profile.py, 2026-12-01: 1.1-2.2x on the 1.5B shape's projections at 1-2 rows,
# 0.5-0.9x at 4-8, where its CUDA-core sums cost more than cuBLAS's tensor cores)
LINEAR_MAX_ROWS = 2
_EMPTY = torch.empty(0)  # "no bias" for the binding (never read)


def supported(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> bool:
    """Whether `gemv` takes these: CUDA fp16/bf16, 1-8 rows, k a multiple of 8, aligned rows,
    one dtype and device, the extension built with the kernel, NANOPD_GEMV not "0"."""
    return (x.is_cuda and x.dtype in fused_ops.DTYPES and x.dim() == 2
            and 1 <= x.shape[0] <= GEMV_MAX_ROWS and x.shape[1] % 8 == 0
            and weight.dtype == x.dtype and weight.device == x.device
            and weight.dim() == 2 and weight.shape[1] == x.shape[1]
            and (bias is None or (bias.dtype == x.dtype and bias.is_contiguous()))
            and fused_ops.rows_ok(x) and fused_ops.rows_ok(weight)
            and os.environ.get("NANOPD_GEMV", "1") != "0" and _built())


def _built() -> bool:
    ops = cuda_ops.load()
    return ops is not None and hasattr(ops, "gemv")


def gemv(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
         out: torch.Tensor | None = None) -> torch.Tensor:
    """`x @ weight.T + bias` for x `[rows, k]` (1-8 rows), weight `[n, k]`, bias `[n]`, in
    fp32 with one rounding to the dtype; into `out` `[rows, n]` (new if None). Torch
    reference: `F.linear` (cuBLAS sums in another order: equal within fp32 rounding before
    the final cast). Raises ValueError on shapes the kernel does not take."""
    if not supported(x, weight, bias):
        raise ValueError(
            f"gemv takes CUDA float16/bfloat16 x [1..{GEMV_MAX_ROWS}, k] (k a multiple of 8) "
            f"and weight [n, k] of x's dtype, rows 16-byte aligned, with the kernels built; got "
            f"x {tuple(x.shape)} {x.dtype} on {x.device}, weight {tuple(weight.shape)} "
            f"{weight.dtype}")
    if out is None:
        out = torch.empty(x.shape[0], weight.shape[0], dtype=x.dtype, device=x.device)
    cuda_ops._raise_on(cuda_ops._ops().gemv(out, x, weight, _EMPTY if bias is None else bias))
    return out


# The model takes the fused GEMVs up to this many rows: one. At two rows they were slower than
# the GEMV and the kernel after it (bench/decode_step.py, H200, 2026-12-02: a decode step at
# batch 2 1.58 ms fused against 1.55 unfused; at batch 1 1.43 against 1.46).
FUSE_MAX_ROWS = 1


def fuse_enabled(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> bool:
    """Whether a layer may take `linear_silu_and_mul` / `linear_rotary_store_kv` for x and this
    weight: NANOPD_GEMV_FUSE not "0", at most FUSE_MAX_ROWS rows, `gemv` takes the shapes, and
    the extension has the kernels."""
    return (os.environ.get("NANOPD_GEMV_FUSE", "1") != "0" and x.dim() == 2
            and x.shape[0] <= FUSE_MAX_ROWS and supported(x, weight, bias)
            and hasattr(cuda_ops.load(), "gemv_silu_and_mul"))


def linear_silu_and_mul(x: torch.Tensor, weight: torch.Tensor,
                        bias: torch.Tensor | None = None) -> torch.Tensor:
    """`silu_and_mul(F.linear(x, weight, bias))` of weight [gate; up] `[2 I, k]` in one kernel,
    for 1-2 rows: bitwise `gemv` then fused_ops' SiLU-and-mul kernel."""
    out = torch.empty(x.shape[0], weight.shape[0] // 2, dtype=x.dtype, device=x.device)
    cuda_ops._raise_on(cuda_ops._ops().gemv_silu_and_mul(
        out, x, weight, _EMPTY if bias is None else bias))
    return out


def linear_rotary_store_kv(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, positions: torch.Tensor,
    cos: torch.Tensor, sin: torch.Tensor, num_heads: int, num_kv_heads: int, head_dim: int,
    k_cache: torch.Tensor, v_cache: torch.Tensor, slot_mapping: torch.Tensor,
) -> torch.Tensor:
    """qkv = F.linear(x, weight, bias) for 1-2 rows of x (decode tokens), with q and k rotated
    and k, v written into their cache slots in the GEMV's epilogue: bitwise `gemv` then
    `fused_ops.rotary_store_kv` without q/k norm (its arguments and errors)."""
    qkv = torch.empty(x.shape[0], weight.shape[0], dtype=x.dtype, device=x.device)
    cuda_ops._raise_on(cuda_ops._ops().gemv_rotary(
        qkv, x, weight, _EMPTY if bias is None else bias, positions, cos, sin, k_cache, v_cache,
        slot_mapping, int(num_heads), int(num_kv_heads), int(head_dim)))
    return qkv


def linear(x: torch.Tensor, weight: torch.Tensor,
           bias: torch.Tensor | None = None) -> torch.Tensor:
    """F.linear, through `gemv` where it applies (CUDA batches of 1-2 rows)."""
    if x.dim() == 2 and x.shape[0] <= LINEAR_MAX_ROWS and supported(x, weight, bias):
        return gemv(x, weight, bias)
    return F.linear(x, weight, bias)


class Linear(torch.nn.Linear):
    """nn.Linear (same parameters and names, so loaders and HF checkpoints see no
    difference) whose forward takes `linear`."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear(x, self.weight, self.bias)
