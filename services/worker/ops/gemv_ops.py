"""Linear layers of decode-sized batches through csrc's GEMV (csrc/gemv.cu), when built.

A decode step of 1-8 sequences multiplies that many rows by every weight: the step streams
the weights, and cuBLAS left much of the bandwidth unused on small layers there
(docs/kernels.md, "Linear layers"). `linear` is a drop-in `F.linear` that takes the kernel
for CUDA fp16/bf16 inputs of 1 to LINEAR_MAX_ROWS rows when the extension is built, unless
`NANOPD_GEMV=0`; F.linear (cuBLAS) otherwise, which is also its torch reference. Nothing
here reads a device value or syncs: every call can be captured in a CUDA graph.

Also the GEMV with the kernels around it folded in (csrc/gemv_fused.cu), which the model takes
for decode steps of one sequence unless `NANOPD_GEMV_FUSE=0` (`fuse_enabled`):
`linear_silu_and_mul` (gate_up_proj) and `linear_rotary_store_kv` (qkv_proj without q/k norm),
bitwise `gemv` then fused_ops' kernel; and the add + RMSNorm between layers split around the
GEMVs (`norms_fusable`, off with `NANOPD_GEMV_NORM=0`): `linear_add` (o_proj, down_proj)
adds into the residual stream and leaves its sums of squares (`Summed`), and the next GEMV
makes the norm from them as it reads its input (a `Norm` given to `linear_normed`,
`linear_silu_and_mul` or `linear_rotary_store_kv`).
"""

from __future__ import annotations

import os
from typing import NamedTuple

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
            and 1 <= x.shape[0] <= GEMV_MAX_ROWS and weight.dim() == 2
            and weight.shape[1] == x.shape[1] and weight_ok(x, weight, bias)
            and fused_ops.rows_ok(x) and os.environ.get("NANOPD_GEMV", "1") != "0" and _built())


def weight_ok(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> bool:
    """The weight's part of `supported`: x's dtype and device, 2-D, k a multiple of 8,
    16-byte aligned rows, a contiguous bias of the dtype or none."""
    return (weight.dtype == x.dtype and weight.device == x.device and weight.dim() == 2
            and weight.shape[1] % 8 == 0
            and (bias is None or (bias.dtype == x.dtype and bias.is_contiguous()))
            and fused_ops.rows_ok(weight))


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


SUM_COLUMNS = 8  # NANOPD_GEMV_SUM_COLUMNS: linear_add's columns per sum of squares
NORM_MAX_HIDDEN = 4096  # NANOPD_GEMV_NORM_MAX_SUMS x SUM_COLUMNS


class Summed(NamedTuple):
    """What `linear_add` leaves beside the residual stream it added into: the sums of squares
    of each row's runs of SUM_COLUMNS columns, fp32 `[rows, ceil(hidden / 8)]`."""

    sums: torch.Tensor


class Norm(NamedTuple):
    """RMSNorm(x) for the GEMV that reads x to make: x's `Summed.sums`, the norm's weight and
    eps. The normed x is `rms_norm`'s up to the order of the sum of squares."""

    sums: torch.Tensor
    weight: torch.Tensor
    eps: float


def norms_fusable(x: torch.Tensor, weights_ok: bool) -> bool:
    """Whether a layer may split its add + RMSNorms around its GEMVs for hidden states x:
    `fuse_enabled`'s conditions (weights_ok: `weight_ok` of each of the layer's qkv, o,
    gate_up and down projections), a hidden size that is a multiple of 8 and at most
    NORM_MAX_HIDDEN, the fused layer kernels and `gemv_add` built, NANOPD_GEMV_NORM not "0"."""
    return (os.environ.get("NANOPD_GEMV_FUSE", "1") != "0"
            and os.environ.get("NANOPD_GEMV_NORM", "1") != "0"
            and os.environ.get("NANOPD_GEMV", "1") != "0"
            and x.dim() == 2 and 1 <= x.shape[0] <= FUSE_MAX_ROWS and x.shape[1] % 8 == 0
            and x.shape[1] <= NORM_MAX_HIDDEN and fused_ops.enabled(x)
            and weights_ok and fused_ops.rows_ok(x) and hasattr(cuda_ops.load(), "gemv_add"))


def _norm_args(norm: Norm | None) -> tuple[torch.Tensor, torch.Tensor, float]:
    return (_EMPTY, _EMPTY, 0.0) if norm is None else (norm.sums, norm.weight, float(norm.eps))


def linear_add(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
               residual: torch.Tensor) -> Summed:
    """`residual += F.linear(x, weight, bias)` in place (the linear output rounded, then the
    add rounded: bitwise fused_add_rms_norm's new residual) for 1-2 rows, in one kernel, with
    the new residual's sums of squares for the next GEMV's `Norm`."""
    sums = torch.empty(residual.shape[0], -(-residual.shape[1] // SUM_COLUMNS),
                       dtype=torch.float32, device=residual.device)
    cuda_ops._raise_on(cuda_ops._ops().gemv_add(
        residual, x, weight, _EMPTY if bias is None else bias, sums))
    return Summed(sums)


def linear_normed(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                  norm: Norm) -> torch.Tensor:
    """`F.linear(RMSNorm(x), weight, bias)` for 1-2 rows of the residual stream x, the norm
    made as the GEMV reads x."""
    out = torch.empty(x.shape[0], weight.shape[0], dtype=x.dtype, device=x.device)
    cuda_ops._raise_on(cuda_ops._ops().gemv_normed(
        out, x, weight, _EMPTY if bias is None else bias, *_norm_args(norm)))
    return out


def linear_silu_and_mul(x: torch.Tensor, weight: torch.Tensor,
                        bias: torch.Tensor | None = None,
                        norm: Norm | None = None) -> torch.Tensor:
    """`silu_and_mul(F.linear(x, weight, bias))` of weight [gate; up] `[2 I, k]` in one kernel,
    for 1-2 rows: bitwise `gemv` then fused_ops' SiLU-and-mul kernel; of RMSNorm(x) with a
    `Norm`."""
    out = torch.empty(x.shape[0], weight.shape[0] // 2, dtype=x.dtype, device=x.device)
    cuda_ops._raise_on(cuda_ops._ops().gemv_silu_and_mul(
        out, x, weight, _EMPTY if bias is None else bias, *_norm_args(norm)))
    return out


def linear_rotary_store_kv(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, positions: torch.Tensor,
    cos: torch.Tensor, sin: torch.Tensor, num_heads: int, num_kv_heads: int, head_dim: int,
    k_cache: torch.Tensor, v_cache: torch.Tensor, slot_mapping: torch.Tensor,
    norm: Norm | None = None,
) -> torch.Tensor:
    """qkv = F.linear(x, weight, bias) for 1-2 rows of x (decode tokens; of RMSNorm(x) with a
    `Norm`), with q and k rotated and k, v written into their cache slots in the GEMV's
    epilogue: bitwise `gemv` then `fused_ops.rotary_store_kv` without q/k norm (its arguments
    and errors)."""
    qkv = torch.empty(x.shape[0], weight.shape[0], dtype=x.dtype, device=x.device)
    cuda_ops._raise_on(cuda_ops._ops().gemv_rotary(
        qkv, x, weight, _EMPTY if bias is None else bias, positions, cos, sin, k_cache, v_cache,
        slot_mapping, int(num_heads), int(num_kv_heads), int(head_dim), *_norm_args(norm)))
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
