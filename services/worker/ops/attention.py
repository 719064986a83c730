"""Paged attention, torch reference path (CPU and GPU; CUDA kernels replace it where built).

KV cache layout, per layer: `k_cache`, `v_cache` of shape
`[num_blocks, block_size, num_kv_heads, head_dim]`. A token at position p of a
sequence lives in slot `block_table[p // block_size] * block_size + p % block_size`.
"""

from __future__ import annotations

import os

import torch
import torch.nn.functional as F

from services.worker.ops import cuda_ops
from services.worker.ops.attn_metadata import AttnMetadata
from services.worker.ops.flash import flash_attention

# NANOPD_DECODE_EARLY_KV=0: paged_decode reads no K/V before the store kernel ahead of it ends
_EARLY_KV = os.environ.get("NANOPD_DECODE_EARLY_KV", "1") != "0"


def store_kv(
    k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
) -> None:
    """Write the step's new keys/values `[num_tokens, num_kv_heads, head_dim]` into their
    slots; a negative slot (a padding row) is skipped. The CUDA kernel where built, else
    `store_kv_reference`."""
    if k.is_cuda and cuda_ops.load() is not None:
        cuda_ops.store_kv(k, v, k_cache, v_cache, slot_mapping)
    else:
        store_kv_reference(k, v, k_cache, v_cache, slot_mapping)


def store_kv_reference(
    k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
) -> None:
    """The torch reference of `store_kv` (index_copy_); it takes no negative slots."""
    kvh, d = k.shape[-2:]
    k_cache.view(-1, kvh, d).index_copy_(0, slot_mapping, k)
    v_cache.view(-1, kvh, d).index_copy_(0, slot_mapping, v)


def gather_kv(
    cache: torch.Tensor, block_tables: torch.Tensor, num_tokens: int
) -> torch.Tensor:
    """`[num_seqs, num_tokens, num_kv_heads, head_dim]` from the paged cache (padded rows junk)."""
    bs = cache.shape[1]
    num_blocks = -(-num_tokens // bs)
    g = cache[block_tables[:, :num_blocks].long()]  # [S, nb, bs, kvh, d]
    return g.flatten(1, 2)[:, :num_tokens]


def _sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float, **kw) -> torch.Tensor:
    """q `[S, H, Lq, D]`, k/v `[S, KVH, Lk, D]`; GQA by repeating KV heads."""
    group = q.shape[1] // k.shape[1]
    if group > 1:
        k = k.repeat_interleave(group, dim=1)
        v = v.repeat_interleave(group, dim=1)
    return F.scaled_dot_product_attention(q, k, v, scale=scale, **kw)


def decode_reference(
    q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, block_tables: torch.Tensor,
    context_lens: torch.Tensor, max_len: int, scale: float,
) -> torch.Tensor:
    """One query per sequence `[S, H, D]` over its first `context_lens` cached positions:
    a padded gather and one masked SDPA (the reference of the CUDA decode kernel too)."""
    k = gather_kv(k_cache, block_tables, max_len).transpose(1, 2)
    v = gather_kv(v_cache, block_tables, max_len).transpose(1, 2)
    mask = torch.arange(max_len, device=q.device)[None, :] < context_lens[:, None]
    o = _sdpa(q[:, :, None, :], k, v, scale, attn_mask=mask[:, None, None, :])
    return o[:, :, 0, :]


def paged_attention(
    q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, meta: AttnMetadata,
    scale: float,
) -> torch.Tensor:
    """Attention of the step's queries `[num_tokens, H, D]` over each sequence's cached KV.

    On a GPU in bf16/fp16 this goes through FlashAttention (ops/flash.py); the torch code
    below is the reference and the CPU path.

    Every query attends to all earlier positions of its own sequence (cached prefix
    included) and to itself: a chunk of a chunked prefill sees the whole prefix.
    """
    if meta.is_decode_only and q.is_cuda and os.environ.get("NANOPD_ATTN", "auto") in (
            "auto", "cuda") and cuda_ops.load() is not None and cuda_ops.decode_supported(
            q, k_cache):  # our CUDA kernel (csrc/), when built with `make kernels`
        # early_kv: in a decode step the kernel just before this one is the layer's store,
        # which writes no KV but each sequence's new token (the model's layers)
        return cuda_ops.paged_decode(q, k_cache, v_cache, meta.block_tables, meta.context_lens,
                                     scale, early_kv=_EARLY_KV)
    fast = flash_attention(q, k_cache, v_cache, meta, scale)
    if fast is not None:
        return fast
    out = torch.empty_like(q)
    nd = meta.num_decode_seqs
    if nd:  # decode: one query per sequence, batched over a padded gather
        out[:nd] = decode_reference(q[:nd], k_cache, v_cache, meta.block_tables[:nd],
                                    meta.context_lens[:nd], max(meta.context_lens_host[:nd]),
                                    scale)
    cu = meta.cu_seqlens_q
    for i in range(nd, meta.num_seqs):  # prefill chunks, one sequence at a time
        q0, q1 = cu[i], cu[i + 1]
        ctx = meta.context_lens_host[i]
        qi = q[q0:q1].transpose(0, 1)[None]  # [1, H, Lq, D]
        k = gather_kv(k_cache, meta.block_tables[i : i + 1], ctx).transpose(1, 2)
        v = gather_kv(v_cache, meta.block_tables[i : i + 1], ctx).transpose(1, 2)
        lq = q1 - q0
        if lq == ctx:
            o = _sdpa(qi, k, v, scale, is_causal=True)
        else:  # query row r sits at position ctx - lq + r and sees keys [0, that position]
            rows = torch.arange(ctx - lq, ctx, device=q.device)[:, None]
            mask = torch.arange(ctx, device=q.device)[None, :] <= rows
            o = _sdpa(qi, k, v, scale, attn_mask=mask)
        out[q0:q1] = o[0].transpose(0, 1)
    return out
