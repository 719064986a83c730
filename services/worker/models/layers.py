"""Building blocks shared by the decoder families: RMSNorm, rotary embedding, SwiGLU.

On CUDA in fp16/bf16 with the kernels built, RMSNorm and SiluAndMul run the fused kernels of
ops/fused_ops.py (`NANOPD_FUSED=0` turns them off); otherwise their torch references in
ops/fused_reference.py, which are HF's arithmetic.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from services.worker.ops import fused_ops
from services.worker.ops.fused_reference import (
    fused_add_rms_norm_reference,
    rms_norm_reference,
    rotary_reference,
    silu_and_mul_reference,
)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(
        self, x: torch.Tensor, residual: torch.Tensor | None = None
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """RMSNorm(x); with `residual`, the residual stream's add-then-norm:
        `(RMSNorm(x + residual), x + residual)`, in place in x and residual on the fused path."""
        fused = fused_ops.enabled(x) and fused_ops.norm_supported(x)
        if residual is None:
            if fused:
                return fused_ops.rms_norm(x, self.weight, self.eps)
            return rms_norm_reference(x, self.weight, self.eps)
        if fused and fused_ops.norm_supported(residual):
            return fused_ops.fused_add_rms_norm(x, residual, self.weight, self.eps)
        return fused_add_rms_norm_reference(x, residual, self.weight, self.eps)


class SiluAndMul(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if fused_ops.enabled(x) and fused_ops.silu_supported(x):
            return fused_ops.silu_and_mul(x)
        return silu_and_mul_reference(x)


SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3")


def rope_inv_freq(head_dim: int, theta: float, scaling: dict[str, Any] | None) -> torch.Tensor:
    """Inverse frequencies for the rotary embedding, with `rope_scaling` applied."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim))
    rope_type = (scaling or {}).get("rope_type", (scaling or {}).get("type", "default"))
    if rope_type == "default":
        return inv_freq
    if rope_type == "linear":
        return inv_freq / float(scaling["factor"])
    if rope_type == "llama3":
        factor = float(scaling["factor"])
        low, high = float(scaling["low_freq_factor"]), float(scaling["high_freq_factor"])
        old_ctx = float(scaling["original_max_position_embeddings"])
        wavelen = 2 * math.pi / inv_freq
        scaled = torch.where(wavelen > old_ctx / low, inv_freq / factor, inv_freq)
        smooth = (old_ctx / wavelen - low) / (high - low)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        medium = (wavelen >= old_ctx / high) & (wavelen <= old_ctx / low)
        return torch.where(medium, smoothed, scaled)
    raise ValueError(
        f"unsupported rope_scaling type {rope_type!r}; supported: {', '.join(SUPPORTED_ROPE_TYPES)}"
    )


class RotaryEmbedding(nn.Module):
    """Non-interleaved (rotate-half) RoPE over a precomputed fp32 cos/sin table."""

    def __init__(self, head_dim: int, max_positions: int, theta: float, scaling: dict | None):
        super().__init__()
        inv_freq = rope_inv_freq(head_dim, theta, scaling)
        freqs = torch.outer(torch.arange(max_positions, dtype=torch.float32), inv_freq)
        emb = torch.cat([freqs, freqs], dim=-1)
        self.register_buffer("cos", emb.cos(), persistent=False)
        self.register_buffer("sin", emb.sin(), persistent=False)

    def forward(
        self, positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """q `[T, H, D]`, k `[T, KVH, D]` rotated by their positions `[T]` (the torch path;
        on the fused path Attention calls fused_ops.rotary_store_kv with these tables)."""
        return rotary_reference(positions, q, k, self.cos, self.sin)
