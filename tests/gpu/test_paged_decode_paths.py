"""paged_decode's latency paths against fp64 attention (helpers of test_kernels.py): the
block-table entries loaded before the context length is known (a guess of min_chunk-token
chunks, right at and below num_splits * min_chunk, wrong above it), a table wider than its
used columns, and the split combine from an unaligned workspace. Skipped without the kernels.
"""

from __future__ import annotations

import os

import pytest
import torch

from services.worker.ops import cuda_ops
from tests.gpu.test_kernels import (
    NUM_KV_HEADS,
    check_graph_replays,
    make_cache,
    reference,
    run_decode,
)

pytestmark = pytest.mark.skipif(cuda_ops.load() is None,
                                reason="kernels not built (make kernels) or no CUDA")


def _edge_lens(num_splits: int, min_chunk: int) -> list[int]:
    """Ragged contexts around num_splits * min_chunk, where the kernel's guess turns wrong."""
    edge = num_splits * min_chunk
    return [edge, edge + 1, edge - 1, edge + 63, edge + 64, edge + 65, 2 * edge + 17, 1, 17,
            min_chunk, min_chunk + 1, 3 * min_chunk - 5]


@pytest.mark.parametrize("num_splits,min_chunk", [(4, 128), (32, 128), (7, 64), (1, 128)])
@pytest.mark.parametrize("head_dim", [64, 128])
@pytest.mark.parametrize("group", [6, 12])  # 12: the 16-row variant
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_guessed_table_entries_right_and_wrong(num_splits, min_chunk, head_dim, group, dtype):
    for block_size in (16, 32):
        run_decode(_edge_lens(num_splits, min_chunk), group, head_dim, block_size, dtype,
                   num_splits=num_splits, min_chunk=min_chunk)


def test_table_wider_than_its_used_columns():
    """The graph runner's static table: a column slice of a wider one. Every entry past a
    context's blocks (inside the row or past the slice) names a block that is all NaN, so an
    entry guessed for a chunk the context does not have must never be used."""
    lens = [40, 1, 300, 513, 4097, 1000]
    k_cache, v_cache, tables = make_cache(lens, NUM_KV_HEADS, 128, 16, torch.bfloat16)
    used = {int(b) for i, c in enumerate(lens) for b in tables[i, : -(-c // 16)]}
    nan_block = min(set(range(k_cache.shape[0])) - used)
    wide = torch.full((len(lens), tables.shape[1] + 300), nan_block, dtype=torch.int32,
                      device="cuda")
    for i, c in enumerate(lens):
        wide[i, : -(-c // 16)] = tables[i, : -(-c // 16)]
    q = torch.randn(len(lens), NUM_KV_HEADS * 6, 128, device="cuda").bfloat16()
    ctx = torch.tensor(lens, dtype=torch.int32, device="cuda")
    ref = reference(q, k_cache, v_cache, tables, lens, 0.1)
    for num_splits, min_chunk in [(32, 128), (64, 64), (4, 128), (1, 64)]:
        out = torch.full_like(q, float("nan"))
        cuda_ops.paged_decode(q, k_cache, v_cache, wide[:, : tables.shape[1]], ctx, 0.1,
                              out=out, num_splits=num_splits, min_chunk=min_chunk)
        assert not out.isnan().any(), (num_splits, min_chunk)
        torch.testing.assert_close(out.double(), ref, atol=1e-2, rtol=1e-2)


@pytest.mark.parametrize("warps", [4, 8])
def test_split_combine_from_an_unaligned_workspace(warps):
    """partial_out 4 bytes past a 16-byte boundary: the combine's scalar loads."""
    lens = [3000, 700, 5, 129]
    k_cache, v_cache, tables = make_cache(lens, NUM_KV_HEADS, 128, 16, torch.bfloat16)
    num_seqs, heads, d, splits = len(lens), NUM_KV_HEADS * 6, 128, 8
    q = torch.randn(num_seqs, heads, d, device="cuda").bfloat16()
    f32 = {"dtype": torch.float32, "device": "cuda"}
    partial_out = torch.empty(num_seqs * heads * splits * d + 1, **f32)[1:]
    partial_out = partial_out.view(num_seqs, heads, splits, d)
    assert partial_out.data_ptr() % 16 == 4
    partial_max = torch.empty(num_seqs, heads, splits, **f32)
    partial_sum = torch.empty_like(partial_max)
    counters = torch.zeros(num_seqs * NUM_KV_HEADS, dtype=torch.int32, device="cuda")
    out = torch.full_like(q, float("nan"))
    ctx = torch.tensor(lens, dtype=torch.int32, device="cuda")
    error = cuda_ops._ops().paged_decode(out, q, k_cache, v_cache, tables, ctx, partial_out,
                                         partial_max, partial_sum, counters, 0.1, splits, 64,
                                         False, warps)
    assert error == ""
    ref = reference(q, k_cache, v_cache, tables, lens, 0.1)
    torch.testing.assert_close(out.double(), ref, atol=1e-2, rtol=1e-2)
    assert int(counters.abs().sum()) == 0


@pytest.mark.parametrize("warps", [4, 8])
def test_guess_in_a_cuda_graph(warps):
    """One capture; replays whose contexts make the guess right, wrong, or mixed."""
    check_graph_replays([[512, 100, 1, 3], [513, 2000, 4097, 64], [40, 513, 512, 9000]],
                        (1, 0, 2, 1), num_splits=4, min_chunk=128, warps=warps)


def test_ring_size_comes_from_the_build():
    """choose_num_splits sizes its wave by the built kernel's shared memory; the CPU fallback
    (the default build's formula) agrees with a default build; a shape the build lacks gets
    the formula, and paged_decode's own refusal (test_paged_decode_refuses_other_warp_counts)."""
    module = cuda_ops.load()
    for head_dim in (64, 128):
        for warps in (4, 8):
            built = module.paged_decode_smem_nbytes(head_dim, warps)
            assert cuda_ops.decode_ring_nbytes(head_dim, warps) == built
            if "NANOPD_KERNELS_DIR" not in os.environ:  # the default build
                assert built == warps * cuda_ops.DECODE_STAGES * 16 * 2 * head_dim * 2
    assert module.paged_decode_smem_nbytes(96, 4) == 0
    assert module.paged_decode_smem_nbytes(128, 6) == 0
    assert cuda_ops.decode_ring_nbytes(128, 6) == 6 * cuda_ops.DECODE_STAGES * 16 * 2 * 128 * 2
