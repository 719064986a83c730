"""The hand-written CUDA kernels of csrc/, when built; each names its torch reference.

`make kernels` (on a GPU machine) builds build/kernels/nanopd_kernels.so; `load()` imports it
if it is there and never compiles, so CPU users and CI need no nvcc. docs/kernels.md tells
how the kernels work and how they are tested and measured.
"""

from __future__ import annotations

import functools
import importlib.util
import logging
import os
from pathlib import Path
from types import ModuleType

import torch

log = logging.getLogger(__name__)

ROOT = Path(__file__).resolve().parents[3]
# NANOPD_KERNELS_DIR: another build (csrc/build.py --variant) for tuning runs
BUILD_DIR = Path(os.environ.get("NANOPD_KERNELS_DIR", ROOT / "build" / "kernels"))
NAME = "nanopd_kernels"


def _min_chunk_from_env() -> int:
    value = os.environ.get("NANOPD_DECODE_MIN_CHUNK", "128")
    if not value.isdigit() or int(value) == 0 or int(value) % 64:
        raise ValueError(f"NANOPD_DECODE_MIN_CHUNK={value!r}: must be a positive multiple of 64")
    return int(value)


# tokens: paged_decode splits no sequence into chunks shorter than this
# (NANOPD_DECODE_MIN_CHUNK, for tuning runs)
MIN_CHUNK = _min_chunk_from_env()
MAX_SPLITS = 32   # chunks per sequence at most (the kernel takes up to 256)

_module: ModuleType | None = None
_tried = False


def load() -> ModuleType | None:
    """The built extension, or None (not built, no CUDA, or built against another torch)."""
    global _module, _tried
    if _tried:
        return _module
    _tried = True
    path = BUILD_DIR / f"{NAME}.so"
    if not path.exists() or not torch.cuda.is_available():
        return None
    sources = [p for p in (ROOT / "csrc").iterdir() if p.suffix in (".cu", ".cuh", ".cpp", ".h")]
    newest_source = max(p.stat().st_mtime for p in sources)
    if newest_source > path.stat().st_mtime:
        log.warning("%s is older than csrc/; run `make kernels` to rebuild it", path)
    try:
        spec = importlib.util.spec_from_file_location(NAME, path)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
    except ImportError as e:
        log.warning("cannot import %s (%s); rebuild with `make kernels`", path, e)
        return None
    _module = module
    return module


def _ops() -> ModuleType:
    module = load()
    if module is None:
        raise RuntimeError(f"the nanopd CUDA kernels are not built ({BUILD_DIR / NAME}.so); "
                           "run `make kernels` on a machine with a GPU and nvcc")
    return module


def _raise_on(error: str) -> None:
    """The bindings return their error instead of throwing (csrc/binding_checks.h)."""
    if error:
        raise RuntimeError(error)


@functools.cache
def _num_sms(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def _device_sms(device: torch.device) -> int:
    return _num_sms(device.index if device.index is not None else 0)


def choose_warps(num_seqs: int, num_kv_heads: int, device: torch.device) -> int:
    """Warps a paged_decode block: 8 for batches of at most one (sequence, KV head) pair per
    4 SMs, where a wider block halves each warp's serial tiles and combines up to 16 chunks
    in one round, not 8; otherwise 4, the bandwidth build. H200, 2026-12-03 (call 9b,
    bench/results/README.md "ninth round"), each at its own chunk count: 8 warps 7-8% faster
    at batch 1 and 2k-8k (a decode step at 1 / 4096 4% faster), level at batch 8, 3-4%
    slower at batch 32-64 and 8k, 11% slower at 128 / 512.
    NANOPD_DECODE_WARPS=4 or 8 (read at each call; a CUDA graph keeps what it captured)
    overrides it for A/B runs. Depends on the batch only, like choose_num_splits."""
    value = os.environ.get("NANOPD_DECODE_WARPS", "auto")
    if value in ("4", "8"):
        return int(value)
    if value != "auto":
        raise ValueError(f"NANOPD_DECODE_WARPS={value!r}: must be 4, 8 or auto")
    return 8 if 4 * num_seqs * num_kv_heads <= _device_sms(device) else 4


# K/V bytes in flight an SM past which more blocks an SM lose (see choose_num_splits)
RING_NBYTES_PER_SM = 96 * 1024
DECODE_STAGES = 3  # tiles in each warp's cp.async ring of the default build (csrc/)


def decode_ring_nbytes(head_dim: int, warps: int) -> int:
    """Shared memory of one paged_decode block, its warps' cp.async rings: what the built
    kernels say (a tuning build may have other NANOPD_DECODE_STAGES); without them, or for
    a shape they lack (which paged_decode then refuses with its own message), the default
    build's: DECODE_STAGES tiles a warp of 16 tokens' K and V, 16-bit
    (tests/gpu/test_paged_decode_paths.py checks the two agree on a default build)."""
    module = load()
    nbytes = module.paged_decode_smem_nbytes(head_dim, warps) if module is not None else 0
    return nbytes if nbytes > 0 else warps * DECODE_STAGES * 16 * 2 * head_dim * 2


def choose_num_splits(num_seqs: int, num_kv_heads: int, device: torch.device,
                      head_dim: int = 128, warps: int = 4) -> int:
    """Chunks per sequence for paged_decode's grid: when every context is long, as many as
    give each SM the blocks whose cp.async rings hold RING_NBYTES_PER_SM of K/V (at least
    one block): 1 block an SM at head_dim 128 (96 KiB with 4 warps, 192 with 8), and at 64
    2 of 4 warps or 1 of 8; never more. An SM streaming that much reads 0.91 of the copy
    bandwidth, and a further block an SM costs more in its combine than it brings. H200,
    2026-12-03 (call 9b, bench/results/README.md "ninth round"), the chunk sweeps at batch
    1-128 and 512-8k tokens: 64 / 2k 45.6 us in 1 chunk, 47.9 in 2; 128 / 8k at head_dim 64
    137.6 in 1, 142.8 in 2 (4 warps); a partial second wave cost up to 25% (2026-12-01). It
    depends on the batch only, never on context lengths, so one captured CUDA graph serves
    every step of its batch size; short contexts use fewer chunks (at least MIN_CHUNK
    tokens each) and their spare blocks exit at once."""
    per_sm = max(1, RING_NBYTES_PER_SM // decode_ring_nbytes(head_dim, warps))
    wave = per_sm * _device_sms(device)
    return max(1, min(MAX_SPLITS, wave // max(1, num_seqs * num_kv_heads)))


_counters: dict[torch.device, torch.Tensor] = {}


def _split_counters(num: int, device: torch.device) -> torch.Tensor:
    """Zeroed int32 semaphores of paged_decode's split combine; the kernel leaves them zero.
    Kept per device and grown, never shrunk (allocate the largest batch before capturing
    CUDA graphs)."""
    c = _counters.get(device)
    if c is None or c.numel() < num:
        c = torch.zeros(max(num, 4096), dtype=torch.int32, device=device)
        _counters[device] = c
    return c


def decode_supported(q: torch.Tensor, k_cache: torch.Tensor) -> bool:
    """Whether paged_decode is built for these dtypes and shapes (else: flash or torch)."""
    group, rem = divmod(q.shape[1], k_cache.shape[2])
    return (q.is_cuda and q.dtype in (torch.float16, torch.bfloat16)
            and k_cache.dtype == q.dtype and q.shape[-1] in (64, 128)
            and k_cache.shape[1] % 16 == 0 and rem == 0 and group <= 16)


def paged_decode(
    q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, block_tables: torch.Tensor,
    context_lens: torch.Tensor, scale: float, *, num_splits: int | None = None,
    min_chunk: int = MIN_CHUNK, out: torch.Tensor | None = None, early_kv: bool = False,
    warps: int | None = None,
) -> torch.Tensor:
    """Decode attention: one query `[num_seqs, num_heads, head_dim]` per sequence over its
    `context_lens[i]` cached tokens (0: a zero output); returns `out` of q's shape.

    k_cache/v_cache `[num_blocks, block_size, num_kv_heads, head_dim]` (a layer's view of the
    pool), block_tables int32 `[>= num_seqs, max_blocks]`, context_lens int32
    `[>= num_seqs]`; fp16/bf16, head_dim 64 or 128, block_size a multiple of 16, up to 16
    query heads per KV head. Each context is cut on the device into at most `num_splits`
    equal chunks (default `choose_num_splits`) of at least `min_chunk` tokens (a multiple of
    64), by blocks of `warps` warps (4 or 8, default `choose_warps`). Nothing here reads a
    device value or depends on a context length: safe to capture in a CUDA graph.
    `early_kv` promises that the kernel just before this call on the stream wrote no KV slot
    but each sequence's last (a decode step's own store): the first K/V tiles are then
    fetched before that kernel has finished (csrc/launch.h). Torch reference:
    `paged_decode_reference` (ops.attention).
    """
    ops = _ops()
    if not decode_supported(q, k_cache):
        raise RuntimeError(
            f"paged_decode is not built for q {tuple(q.shape)} {q.dtype} over k_cache "
            f"{tuple(k_cache.shape)}: head_dim must be 64 or 128, block_size a multiple of "
            "16, at most 16 query heads per KV head, float16 or bfloat16")
    num_seqs, num_heads, head_dim = q.shape
    if out is None:
        out = torch.empty_like(q)
    if num_seqs == 0:
        return out
    num_kv_heads = k_cache.shape[2]
    if warps is None:
        warps = choose_warps(num_seqs, num_kv_heads, q.device)
    if num_splits is None:
        num_splits = choose_num_splits(num_seqs, num_kv_heads, q.device, head_dim, warps)
    f32 = {"dtype": torch.float32, "device": q.device}
    if num_splits > 1:
        partial_out = torch.empty(num_seqs, num_heads, num_splits, head_dim, **f32)
        partial_max = torch.empty(num_seqs, num_heads, num_splits, **f32)
        partial_sum = torch.empty_like(partial_max)
        counters = _split_counters(num_seqs * num_kv_heads, q.device)
    else:
        partial_out = partial_max = partial_sum = torch.empty(0, **f32)
        counters = torch.empty(0, dtype=torch.int32, device=q.device)
    _raise_on(ops.paged_decode(out, q, k_cache, v_cache, block_tables, context_lens,
                               partial_out, partial_max, partial_sum, counters, float(scale),
                               int(num_splits), int(min_chunk), bool(early_kv), int(warps)))
    return out


def paged_decode_reference(
    q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, block_tables: torch.Tensor,
    context_lens: torch.Tensor, scale: float,
) -> torch.Tensor:
    """The torch reference of `paged_decode` (padded gather, masked SDPA; any dtype/device)."""
    from services.worker.ops.attention import decode_reference  # attention imports this module

    return decode_reference(q, k_cache, v_cache, block_tables, context_lens,
                            int(context_lens.max()), scale)


def store_kv(key: torch.Tensor, value: torch.Tensor, k_cache: torch.Tensor,
             v_cache: torch.Tensor, slot_mapping: torch.Tensor) -> None:
    """Write `[num_tokens, num_kv_heads, head_dim]` keys/values into their cache slots
    (int64 `slot_mapping`, slot = block * block_size + offset; a negative slot is skipped).

    Torch reference: `ops.attention.store_kv_reference` (index_copy_). Any dtype; head_dim *
    element size a multiple of 16 bytes; key/value may be strided views (of the fused qkv).
    """
    _raise_on(_ops().store_kv(key, value, k_cache, v_cache, slot_mapping))


def _ids(ids: list[int] | torch.Tensor, num_blocks: int, name: str,
         device: torch.device) -> torch.Tensor:
    if isinstance(ids, torch.Tensor):
        return ids.to(device=device, dtype=torch.int64, non_blocking=True).contiguous()
    if any(not 0 <= i < num_blocks for i in ids):
        raise ValueError(f"{name} has ids outside [0, {num_blocks}): "
                         f"{[i for i in ids if not 0 <= i < num_blocks][:8]}")
    host = torch.tensor(ids, dtype=torch.int64, pin_memory=True)
    return host.to(device, non_blocking=True)


def copy_blocks(src_pool: torch.Tensor, dst_pool: torch.Tensor,
                src_ids: list[int] | torch.Tensor, dst_ids: list[int] | torch.Tensor) -> None:
    """`dst_pool[:, :, dst_ids] = src_pool[:, :, src_ids]` for pools `[num_layers, 2,
    num_blocks, block_size, num_kv_heads, head_dim]`, in one launch on dst_pool's GPU and its
    current stream. src_pool may live on another GPU (peer access) or be a peer process's pool
    opened through CUDA IPC; the kernel reads it directly. No dst id may also be a src id.
    Lists are bounds-checked here; tensors are trusted.

    Torch reference: `copy_blocks_reference` (as in ModelRunner.copy_blocks).
    """
    if len(src_ids) != len(dst_ids):
        raise ValueError(f"{len(src_ids)} src ids for {len(dst_ids)} dst ids")
    if len(src_ids) == 0:
        return
    dev = dst_pool.device
    src = _ids(src_ids, src_pool.shape[2], "src_ids", dev)
    dst = _ids(dst_ids, dst_pool.shape[2], "dst_ids", dev)
    _raise_on(_ops().copy_blocks(src_pool, dst_pool, src, dst))


def copy_blocks_reference(src_pool: torch.Tensor, dst_pool: torch.Tensor,
                          src_ids: list[int], dst_ids: list[int]) -> None:
    """The torch reference of `copy_blocks`: an index gather, a copy across devices, a scatter."""
    src = torch.tensor(src_ids, device=src_pool.device)
    dst = torch.tensor(dst_ids, device=dst_pool.device)
    dst_pool[:, :, dst] = src_pool[:, :, src].to(dst_pool.device)
