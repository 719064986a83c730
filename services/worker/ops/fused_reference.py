"""Torch references of the fused kernels (csrc/fused.cu): what the CPU and fp32 paths run.

Each function computes in the tensors' dtype with torch's roundings, which are the ones HF
transformers' modules use, so our fp32 model stays token-exact with HF; the CUDA kernels
reproduce these roundings (docs/kernels.md, "Fused decoder-layer kernels").
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def rms_norm_reference(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """HF's RMSNorm: statistics in fp32, the normalized x cast to its dtype, times weight."""
    dtype = x.dtype
    xf = x.float()
    xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return weight * xf.to(dtype)


def fused_add_rms_norm_reference(
    x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """(RMSNorm of x + residual, x + residual): the residual stream's add-then-norm."""
    residual = x + residual
    return rms_norm_reference(residual, weight, eps), residual


def silu_and_mul_reference(x: torch.Tensor) -> torch.Tensor:
    """SwiGLU of `[..., 2 * I]` (gate, then up) into `[..., I]`."""
    gate, up = x.chunk(2, dim=-1)
    return F.silu(gate) * up


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat([-x2, x1], dim=-1)


def rotary_reference(
    positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor, cos_table: torch.Tensor,
    sin_table: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotate-half RoPE of q `[T, H, D]` and k `[T, KVH, D]` by positions `[T]`; the fp32
    tables `[max_positions, D]` are cast to q's dtype first, as HF does."""
    cos = cos_table[positions].to(q.dtype)[:, None, :]
    sin = sin_table[positions].to(q.dtype)[:, None, :]
    return q * cos + rotate_half(q) * sin, k * cos + rotate_half(k) * sin


def split_qkv(qkv: torch.Tensor, num_heads: int, num_kv_heads: int,
              head_dim: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Views q `[T, H, D]`, k and v `[T, KVH, D]` of the fused projection output."""
    q, k, v = qkv.split([num_heads * head_dim, num_kv_heads * head_dim,
                         num_kv_heads * head_dim], dim=-1)
    return (q.view(-1, num_heads, head_dim), k.view(-1, num_kv_heads, head_dim),
            v.view(-1, num_kv_heads, head_dim))


def rotary_qk_reference(
    qkv: torch.Tensor, positions: torch.Tensor, cos_table: torch.Tensor,
    sin_table: torch.Tensor, num_heads: int, num_kv_heads: int, head_dim: int,
    q_norm_weight: torch.Tensor | None = None, k_norm_weight: torch.Tensor | None = None,
    eps: float = 0.0,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(q, k, v) of qkv with q and k rotated (after Qwen3's per-head RMSNorm when the norm
    weights are given): the first half of `rotary_store_kv`; the torch path then stores k
    and v with `ops.attention.store_kv`. qkv is not modified."""
    q, k, v = split_qkv(qkv, num_heads, num_kv_heads, head_dim)
    if q_norm_weight is not None:
        q = rms_norm_reference(q, q_norm_weight, eps)
        k = rms_norm_reference(k, k_norm_weight, eps)
    q, k = rotary_reference(positions, q, k, cos_table, sin_table)
    return q, k, v
