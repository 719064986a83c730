"""GPU attention through torch's varlen FlashAttention (`torch.nn.attention.varlen`).

Two routes, chosen once per process by probing what the installed torch accepts:
- `paged`: FlashAttention reads K/V straight from the paged pool through the block table;
- `packed`: gather each sequence's exact context (no padding) into a packed buffer, then
  varlen FlashAttention over it (GQA native, causal aligned to the bottom right).
Beside them, a step that is one long prompt with nothing cached (the common shape of a long
prefill: the prompt fills the token budget alone) goes to cuDNN's attention through SDPA,
which bench/prefill_attention.py measured 2.7x faster than the packed route at 4096 tokens
on an H200 (184 vs 505 us, 2026-12-01); short prompts, batches and chunks over a cached
prefix stay on the varlen route (per-sequence SDPA calls lose there).
If neither runs (old torch, fp32, CPU), callers use the torch reference path.
`NANOPD_ATTN=torch|packed|paged` forces a route (for tests and benchmarks).
"""

from __future__ import annotations

import inspect
import logging
import os

import torch

from services.worker.ops.attn_metadata import AttnMetadata

log = logging.getLogger(__name__)

try:
    from torch.nn.attention.varlen import varlen_attn

    _PARAMS = set(inspect.signature(varlen_attn).parameters)
except ImportError:  # torch without varlen attention
    varlen_attn, _PARAMS = None, set()
# torch 2.11 takes fewer K/V heads than Q heads without a flag; later versions want the flag
_GQA = {"enable_gqa": True} if "enable_gqa" in _PARAMS else {}

_routes: list[str] | None = None


def _candidate_routes() -> list[str]:
    forced = os.environ.get("NANOPD_ATTN", "auto")
    if varlen_attn is None or forced == "torch":
        return []
    routes = ["paged", "packed"] if forced == "auto" else [forced]
    if "block_table" not in _PARAMS:  # paged KV arrived in torch's varlen after 2.11
        routes = [r for r in routes if r != "paged"]
    return routes


def _paged(q, k_cache, v_cache, meta: AttnMetadata, scale: float) -> torch.Tensor:
    return varlen_attn(
        q, k_cache, v_cache, meta.cu_seqlens_q_dev, None, meta.max_q,
        max(meta.context_lens_host), scale=scale, window_size=(-1, 0),
        seqused_k=meta.context_lens, block_table=meta.block_tables, **_GQA,
    )


def _packed_index(meta: AttnMetadata, block_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Flat slots of every sequence's context, in order, and their cu_seqlens (once a step)."""
    if "packed" not in meta.derived:
        dev = meta.context_lens.device
        nb = -(-max(meta.context_lens_host) // block_size)
        tables = meta.block_tables[:, :nb].long()
        slots = (tables[:, :, None] * block_size + torch.arange(block_size, device=dev))
        slots = slots.flatten(1)
        valid = torch.arange(nb * block_size, device=dev)[None, :] < meta.context_lens[:, None]
        cu_k = torch.zeros(meta.num_seqs + 1, dtype=torch.int32, device=dev)
        cu_k[1:] = meta.context_lens.cumsum(0)
        meta.derived["packed"] = (slots[valid], cu_k)
    return meta.derived["packed"]


def _packed(q, k_cache, v_cache, meta: AttnMetadata, scale: float) -> torch.Tensor:
    kvh, d = k_cache.shape[2], k_cache.shape[3]
    idx, cu_k = _packed_index(meta, k_cache.shape[1])
    k = k_cache.view(-1, kvh, d)[idx]
    v = v_cache.view(-1, kvh, d)[idx]
    return varlen_attn(
        q, k, v, meta.cu_seqlens_q_dev, cu_k, meta.max_q, max(meta.context_lens_host),
        scale=scale, window_size=(-1, 0), **_GQA,
    )


_IMPLS = {"paged": _paged, "packed": _packed}
CUDNN_MIN_TOKENS = 1024  # a whole prompt at least this long takes the cuDNN route
_cudnn_ok = True


def _whole_prompt_cudnn(q, k_cache, v_cache, meta: AttnMetadata, scale: float):
    """One sequence, all of its context new: causal SDPA on cuDNN; None if not that case."""
    global _cudnn_ok
    n = q.shape[0]
    if not (_cudnn_ok and meta.num_seqs == 1 and meta.context_lens_host[0] == n
            and n >= CUDNN_MIN_TOKENS and os.environ.get("NANOPD_ATTN", "auto") == "auto"):
        return None
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from services.worker.ops.attention import gather_kv

    group = q.shape[1] // k_cache.shape[2]
    k = gather_kv(k_cache, meta.block_tables[:1], n)[0].transpose(0, 1)  # [kvh, n, d]
    v = gather_kv(v_cache, meta.block_tables[:1], n)[0].transpose(0, 1)
    k, v = k.repeat_interleave(group, 0)[None], v.repeat_interleave(group, 0)[None]
    try:
        with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
            o = torch.nn.functional.scaled_dot_product_attention(
                q.transpose(0, 1)[None], k, v, is_causal=True, scale=scale)
    except RuntimeError as e:
        log.warning("cuDNN attention unavailable (%s); long prompts use varlen flash", e)
        _cudnn_ok = False
        return None
    return o[0].transpose(0, 1)


def flash_attention(
    q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, meta: AttnMetadata,
    scale: float,
) -> torch.Tensor | None:
    """Output `[num_tokens, H, D]`, or None when no flash route runs here."""
    global _routes
    if not q.is_cuda or q.dtype not in (torch.float16, torch.bfloat16):
        return None
    if meta.cu_seqlens_q_dev is None:
        return None
    if _routes is None:
        _routes = _candidate_routes()
    if _routes:
        out = _whole_prompt_cudnn(q, k_cache, v_cache, meta, scale)
        if out is not None:
            return out
    while _routes:
        try:
            return _IMPLS[_routes[0]](q, k_cache, v_cache, meta, scale)
        except (RuntimeError, TypeError, ValueError) as e:
            log.warning("attention route %r unavailable (%s); trying the next", _routes[0], e)
            _routes.pop(0)
    return None


def active_route() -> str:
    """The route in use (after the first call): 'paged', 'packed' or 'torch'."""
    return _routes[0] if _routes else "torch"
