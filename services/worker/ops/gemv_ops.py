"""Linear layers of decode-sized batches through csrc's GEMV (csrc/gemv.cu), when built.

A decode step of 1-8 sequences multiplies that many rows by every weight: the step streams
the weights, and cuBLAS left much of the bandwidth unused on small layers there
(docs/kernels.md, "Linear layers"). `linear` is a drop-in `F.linear` that takes the kernel
for CUDA fp16/bf16 inputs of 1 to LINEAR_MAX_ROWS rows when the extension is built, unless
`NANOPD_GEMV=0`; F.linear (cuBLAS) otherwise, which is also its torch reference. Nothing
here reads a device value or syncs: every call can be captured in a CUDA graph.

Also, behind `NANOPD_GEMV_FUSE=1` (off by default: not yet run on a GPU), the GEMV with the
layer's add + RMSNorm or SwiGLU made inside it (csrc/gemv_fused.cu): `add_norm_linear`,
`swiglu_linear`, with the fused_reference functions then F.linear as their references.
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


PROLOGUE_ADD_NORM, PROLOGUE_SWIGLU = 1, 2  # NANOPD_GEMV_ADD_NORM, NANOPD_GEMV_SWIGLU
PROLOGUE_MAX_NBYTES = 160 * 1024  # NANOPD_GEMV_PROLOGUE_MAX_NBYTES: rows x k of x


def fuse_enabled(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                 k: int) -> bool:
    """Whether the layer may take `add_norm_linear` / `swiglu_linear` for x: NANOPD_GEMV_FUSE
    is "1", 1-2 rows (LINEAR_MAX_ROWS), a row of k elements fits the kernel's shared memory,
    and `gemv` takes the shapes otherwise."""
    return (os.environ.get("NANOPD_GEMV_FUSE", "0") == "1" and x.dim() == 2
            and x.shape[0] <= LINEAR_MAX_ROWS and weight.shape[1] == k
            and x.shape[0] * k * x.element_size() <= PROLOGUE_MAX_NBYTES
            and supported(x[:, :k], weight, bias)
            and hasattr(cuda_ops.load(), "gemv_prologue"))


def add_norm_linear(x: torch.Tensor, residual: torch.Tensor | None, norm_weight: torch.Tensor,
                    eps: float, weight: torch.Tensor,
                    bias: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """`(F.linear(RMSNorm(x + residual)), x + residual)` in one kernel, for 1-2 rows; with
    residual None, `(F.linear(RMSNorm(x)), x)`. x and residual are not modified (the new
    residual is a new tensor). Torch reference: `fused_add_rms_norm_reference` (or
    `rms_norm_reference`) then F.linear; as those kernels, up to the order of the mean of
    squares."""
    rows, k = x.shape
    out = torch.empty(rows, weight.shape[0], dtype=x.dtype, device=x.device)
    res_out = (_EMPTY if residual is None
               else torch.empty(rows, k, dtype=x.dtype, device=x.device))
    cuda_ops._raise_on(cuda_ops._ops().gemv_prologue(
        out, x, weight, _EMPTY if bias is None else bias,
        _EMPTY if residual is None else residual, res_out, norm_weight, float(eps),
        PROLOGUE_ADD_NORM))
    return out, (x if residual is None else res_out)


def swiglu_linear(gate_up: torch.Tensor, weight: torch.Tensor,
                  bias: torch.Tensor | None = None) -> torch.Tensor:
    """`F.linear(silu(gate) * up)` of gate_up `[rows, 2 k]` (gate, then up) in one kernel, for
    1-2 rows. Torch reference: `silu_and_mul_reference` then F.linear."""
    out = torch.empty(gate_up.shape[0], weight.shape[0], dtype=gate_up.dtype,
                      device=gate_up.device)
    cuda_ops._raise_on(cuda_ops._ops().gemv_prologue(
        out, gate_up, weight, _EMPTY if bias is None else bias, _EMPTY, _EMPTY, _EMPTY, 0.0,
        PROLOGUE_SWIGLU))
    return out


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
