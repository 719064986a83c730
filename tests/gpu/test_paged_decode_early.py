"""paged_decode with early_kv (K/V tiles fetched before the previous kernel has finished, the
last slot of each sequence after it) against fp64 attention: the last position in every tile
of a warp, early and late, over splits and shapes; and the decode step's own order, a
programmatic-launch store of each sequence's last K/V (poisoned with NaN before it) straight
before the attention, eager and in a CUDA graph. Skipped without the kernels.
"""

from __future__ import annotations

import pytest
import torch

from services.worker.ops import cuda_ops, fused_ops
from tests.gpu.test_kernels import NUM_KV_HEADS, make_cache, reference, run_decode

pytestmark = pytest.mark.skipif(cuda_ops.load() is None,
                                reason="kernels not built (make kernels) or no CUDA")

# a warp's tiles are 64 tokens apart with 4 warps of 16 (128 with 8): the last position falls
# in a warp's first tile (1..64; 1..128), its second (65..128; 129..256, both fetched early)
# and later ones (129..; 257..)
LAST_IN_EACH_TILE = [1, 2, 15, 16, 17, 48, 63, 64, 65, 80, 127, 128, 129, 130, 192, 193, 255,
                     256, 257, 383, 384, 385, 700, 1024, 1025, 4097, 9000]


@pytest.mark.parametrize("num_splits,min_chunk", [(32, 128), (4, 128), (7, 64), (1, 128),
                                                  (2, 1024)])
@pytest.mark.parametrize("head_dim", [64, 128])
@pytest.mark.parametrize("group", [6, 12])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("warps", [4, 8])
def test_early_kv_matches_fp64(num_splits, min_chunk, head_dim, group, dtype, warps):
    for block_size in (16, 32):
        run_decode(LAST_IN_EACH_TILE, group, head_dim, block_size, dtype,
                   num_splits=num_splits, min_chunk=min_chunk, early_kv=True, warps=warps)


def _last_slots(tables: torch.Tensor, lens: list[int], block_size: int) -> torch.Tensor:
    pos = torch.tensor(lens, device="cuda") - 1
    rows = torch.arange(len(lens), device="cuda")
    return tables[rows, pos // block_size].long() * block_size + pos % block_size


@pytest.mark.parametrize("graph", [False, True], ids=["eager", "graph"])
def test_early_kv_after_the_store_of_the_last_slots(graph):
    """rotary_store_kv (launched with PDL, identity rotation) writes each sequence's last K/V,
    NaN until then, and paged_decode(early_kv=True) follows it on the stream: every output
    must be the attention over the new rows."""
    lens, group, d, bs = [1, 64, 65, 128, 129, 300, 513, 4000], 6, 128, 16
    heads, kvh = NUM_KV_HEADS * group, NUM_KV_HEADS
    k_cache, v_cache, tables = make_cache(lens, kvh, d, bs, torch.bfloat16)
    slots = _last_slots(tables, lens, bs)
    positions = torch.tensor(lens, device="cuda") - 1
    cos = torch.ones(max(lens), d, device="cuda")
    sin = torch.zeros(max(lens), d, device="cuda")
    qkv = torch.empty(len(lens), (heads + 2 * kvh) * d, dtype=torch.bfloat16, device="cuda")
    q = qkv[:, : heads * d].view(len(lens), heads, d)
    ctx = torch.tensor(lens, dtype=torch.int32, device="cuda")
    out = torch.empty_like(q)

    def step() -> None:
        fused_ops.rotary_store_kv(qkv, positions, cos, sin, heads, kvh, d, k_cache, v_cache,
                                  slots)
        cuda_ops.paged_decode(q, k_cache, v_cache, tables, ctx, d**-0.5, out=out,
                              early_kv=True)

    def poison_and_fill(seed: int) -> None:
        g = torch.Generator(device="cuda").manual_seed(seed)
        qkv.copy_(torch.randn(qkv.shape, device="cuda", generator=g))
        for cache in (k_cache, v_cache):
            cache.view(-1, kvh, d)[slots] = float("nan")

    run = step
    if graph:
        poison_and_fill(0)
        step()  # warm-up
        captured = torch.cuda.CUDAGraph()
        with torch.cuda.graph(captured):
            step()
        run = captured.replay
    for i in range(12):
        poison_and_fill(i + 1)
        out.fill_(float("nan"))
        run()
        torch.cuda.synchronize()
        assert not k_cache.view(-1, kvh, d)[slots].isnan().any()
        assert not out.isnan().any(), f"replay {i}: a NaN row was read before its store"
        ref = reference(q, k_cache, v_cache, tables, lens, d**-0.5)
        torch.testing.assert_close(out.double(), ref, atol=1e-2, rtol=1e-2)

