"""The fused decoder-layer kernels of csrc/fused.cu, when built; each names its torch reference.

They cut a layer's ~40 small kernels (norms, rotary, KV store, SwiGLU, residual adds) to ~10
launches (docs/kernels.md). The model (models/layers.py, models/llama.py) calls `enabled(x)`
and takes these for CUDA fp16/bf16 tensors when the extension is built
(`cuda_ops.load()`), unless `NANOPD_FUSED=0`; otherwise the references of
ops/fused_reference.py. Shapes and dtypes are checked here before any call; nothing reads a
device value, allocates by value or syncs, so every call can be captured in a CUDA graph.
"""

from __future__ import annotations

import logging
import os

import torch

from services.worker.ops import cuda_ops

log = logging.getLogger(__name__)

DTYPES = (torch.float16, torch.bfloat16)
MAX_NORM_HIDDEN = 32768  # NANOPD_RMS_NORM_MAX_HIDDEN in csrc/fused_kernels.h
ROTARY_HEAD_DIMS = (16, 32, 64, 128, 256, 512)
_FUNCTIONS = ("rms_norm", "fused_add_rms_norm", "rotary_store_kv", "silu_and_mul")
_has_functions: bool | None = None  # of the loaded extension, once known


def _built() -> bool:
    """The extension is loaded and has the fused kernels (an older build may not)."""
    global _has_functions
    ops = cuda_ops.load()
    if ops is None:
        return False
    if _has_functions is None:
        _has_functions = all(hasattr(ops, f) for f in _FUNCTIONS)
        if not _has_functions:
            log.warning("the nanopd kernels were built before csrc/fused.cu; run `make "
                        "kernels` for the fused layer kernels (the torch path meanwhile)")
    return _has_functions


def enabled(x: torch.Tensor) -> bool:
    """Whether the model should take the fused kernels for activations like x: CUDA, fp16 or
    bf16, the kernels built, and `NANOPD_FUSED` not "0" (read at every call, so a test or a
    benchmark can switch paths inside one process)."""
    return (x.is_cuda and x.dtype in DTYPES and os.environ.get("NANOPD_FUSED", "1") != "0"
            and _built())


def rows_ok(t: torch.Tensor) -> bool:
    """2-D, last dimension contiguous, rows 16-byte aligned: what the kernels' loads need."""
    nbytes = t.element_size()
    return (t.dim() == 2 and t.stride(-1) == 1 and t.data_ptr() % 16 == 0
            and ((t.stride(0) * nbytes) % 16 == 0 or t.shape[0] <= 1))


def norm_supported(x: torch.Tensor) -> bool:
    return rows_ok(x) and x.shape[1] % 8 == 0 and 0 < x.shape[1] <= MAX_NORM_HIDDEN


def silu_supported(x: torch.Tensor) -> bool:
    return rows_ok(x) and x.shape[1] % 16 == 0 and x.shape[1] > 0


def rotary_supported(qkv: torch.Tensor, head_dim: int) -> bool:
    return rows_ok(qkv) and head_dim in ROTARY_HEAD_DIMS


def _check(ok: bool, message: str) -> None:
    if not ok:
        raise ValueError(message)


def _check_weight(w: torch.Tensor, x: torch.Tensor, size: int, name: str) -> None:
    _check(w.dtype == x.dtype and w.device == x.device and w.shape == (size,)
           and w.is_contiguous(),
           f"{name} must be contiguous [{size}] {x.dtype} on {x.device}; got "
           f"{tuple(w.shape)} {w.dtype} on {w.device}")


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float,
             out: torch.Tensor | None = None) -> torch.Tensor:
    """RMSNorm of each row of x `[T, H]` (H a multiple of 8, at most 32768; rows 16-byte
    aligned), into `out` (new if None). Torch reference: `fused_reference.rms_norm_reference`
    (equal up to 1 ulp of the normalized value: the mean is summed in another order)."""
    _check(x.dtype in DTYPES and norm_supported(x),
           f"rms_norm takes float16/bfloat16 [T, H] rows (H a multiple of 8, at most "
           f"{MAX_NORM_HIDDEN}, 16-byte aligned); got {tuple(x.shape)} {x.dtype}")
    _check_weight(weight, x, x.shape[1], "weight")
    if out is None:
        out = torch.empty_like(x, memory_format=torch.contiguous_format)
    cuda_ops._raise_on(cuda_ops._ops().rms_norm(out, x, weight, float(eps)))
    return out


def fused_add_rms_norm(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor,
                       eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """In place: `residual = x + residual`, then `x = RMSNorm(residual)`; returns
    (x, residual). Torch reference: `fused_reference.fused_add_rms_norm_reference` (the new
    residual bitwise, x as `rms_norm`)."""
    _check(x.dtype in DTYPES and norm_supported(x) and norm_supported(residual),
           f"fused_add_rms_norm takes float16/bfloat16 [T, H] rows (H a multiple of 8, at "
           f"most {MAX_NORM_HIDDEN}, 16-byte aligned); got x {tuple(x.shape)} {x.dtype}, "
           f"residual {tuple(residual.shape)}")
    _check(residual.shape == x.shape and residual.dtype == x.dtype,
           f"residual {tuple(residual.shape)} {residual.dtype} must match x "
           f"{tuple(x.shape)} {x.dtype}")
    _check_weight(weight, x, x.shape[1], "weight")
    cuda_ops._raise_on(cuda_ops._ops().fused_add_rms_norm(x, residual, weight, float(eps)))
    return x, residual


def silu_and_mul(x: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """`F.silu(gate) * up` of x `[T, 2 * I]` (gate, then up; I a multiple of 8) into
    `out` `[T, I]` (new if None). Torch reference: `fused_reference.silu_and_mul_reference`
    (bitwise)."""
    _check(x.dtype in DTYPES and silu_supported(x),
           f"silu_and_mul takes float16/bfloat16 [T, 2 * I] rows (I a multiple of 8, "
           f"16-byte aligned); got {tuple(x.shape)} {x.dtype}")
    if out is None:
        out = torch.empty(x.shape[0], x.shape[1] // 2, dtype=x.dtype, device=x.device)
    cuda_ops._raise_on(cuda_ops._ops().silu_and_mul(out, x))
    return out


def rotary_store_kv(
    qkv: torch.Tensor, positions: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
    num_heads: int, num_kv_heads: int, head_dim: int, k_cache: torch.Tensor,
    v_cache: torch.Tensor, slot_mapping: torch.Tensor,
    q_norm_weight: torch.Tensor | None = None, k_norm_weight: torch.Tensor | None = None,
    eps: float = 0.0,
) -> None:
    """Rotate q and k in place in qkv `[T, (H + 2 KVH) D]` by positions `[T]` (int64) over the
    fp32 tables cos/sin `[max_positions, D]` (RotaryEmbedding's), after Qwen3's per-head
    RMSNorm when both norm weights `[D]` are given; then write k and v into
    k_cache/v_cache `[num_blocks, block_size, KVH, D]` at slot_mapping `[T]` (int64; a
    negative slot stores nothing). v stays as it is in qkv; a position outside the tables
    rotates into NaN. Torch reference: `fused_reference.rotary_qk_reference` then
    `ops.attention.store_kv_reference` (rotation bitwise; with q/k norm, as `rms_norm`)."""
    _check(qkv.dtype in DTYPES and rotary_supported(qkv, head_dim),
           f"rotary_store_kv takes float16/bfloat16 qkv [T, W] with 16-byte aligned rows and "
           f"head_dim in {ROTARY_HEAD_DIMS}; got {tuple(qkv.shape)} {qkv.dtype}, "
           f"head_dim {head_dim}")
    width = (num_heads + 2 * num_kv_heads) * head_dim
    _check(qkv.shape[1] == width, f"qkv has {qkv.shape[1]} columns; {num_heads} + 2 x "
           f"{num_kv_heads} heads of {head_dim} need {width}")
    num_tokens = qkv.shape[0]
    for name, t in (("positions", positions), ("slot_mapping", slot_mapping)):
        _check(t.dtype == torch.int64 and t.shape == (num_tokens,) and t.device == qkv.device,
               f"{name} must be int64 [{num_tokens}] on {qkv.device}; got {tuple(t.shape)} "
               f"{t.dtype} on {t.device}")
    for name, t in (("cos", cos), ("sin", sin)):
        _check(t.dtype == torch.float32 and t.dim() == 2 and t.shape[1] == head_dim
               and t.is_contiguous(),
               f"{name} must be contiguous float32 [max_positions, {head_dim}]; got "
               f"{tuple(t.shape)} {t.dtype}")
    cache_shape = (num_kv_heads, head_dim)
    _check(k_cache.dim() == 4 and tuple(k_cache.shape[2:]) == cache_shape
           and v_cache.shape == k_cache.shape and k_cache.dtype == qkv.dtype
           and v_cache.dtype == qkv.dtype,
           f"k_cache and v_cache must be [num_blocks, block_size, {num_kv_heads}, {head_dim}] "
           f"{qkv.dtype}; got {tuple(k_cache.shape)} {k_cache.dtype}, {tuple(v_cache.shape)} "
           f"{v_cache.dtype}")
    _check((q_norm_weight is None) == (k_norm_weight is None),
           "give both q_norm_weight and k_norm_weight or neither")
    if q_norm_weight is not None:
        _check_weight(q_norm_weight, qkv, head_dim, "q_norm_weight")
        _check_weight(k_norm_weight, qkv, head_dim, "k_norm_weight")
    else:
        q_norm_weight = k_norm_weight = _EMPTY
    cuda_ops._raise_on(cuda_ops._ops().rotary_store_kv(
        qkv, positions, cos, sin, q_norm_weight, k_norm_weight, float(eps), k_cache, v_cache,
        slot_mapping, int(num_heads), int(num_kv_heads), int(head_dim)))


_EMPTY = torch.empty(0)  # "no norm weight" for the binding (a CPU tensor: never read)
