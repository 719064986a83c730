"""CUDA kernels of csrc/ against references: paged_decode against fp64 attention, store_kv and
copy_blocks bitwise against torch indexing. Skipped without CUDA or without `make kernels`.

Every paged_decode run starts from a NaN-filled output and a NaN-filled cache in which only
the slots of each sequence's context hold data, so a kernel that reads a slot past a context
(or leaves an output element unwritten) fails.
"""

from __future__ import annotations

import random

import pytest
import torch

from services.worker.ops import cuda_ops
from services.worker.ops.attention import gather_kv, store_kv_reference

pytestmark = pytest.mark.skipif(cuda_ops.load() is None,
                                reason="kernels not built (make kernels) or no CUDA")

NUM_KV_HEADS = 2
TOLERANCE = {torch.bfloat16: 1e-2, torch.float16: 2e-3}  # atol = rtol, output vs fp64


def _lengths(name: str) -> list[int]:
    rng = random.Random(name)
    return {
        "one_token": [1],
        "b1_32k": [32768],
        "ragged_edges": [1, 15, 16, 17, 33, 100, 511, 512, 513, 1025],
        "b32_2k": [2048] * 32,
        "b37_ragged_3k": [rng.randint(1, 3000) for _ in range(37)],
        "b256_ragged_1k": [rng.randint(1, 1024) for _ in range(256)],
    }[name]


SHAPES = ["one_token", "b1_32k", "ragged_edges", "b32_2k", "b37_ragged_3k", "b256_ragged_1k"]


def make_cache(ctx_lens: list[int], num_kv_heads: int, head_dim: int, block_size: int,
               dtype: torch.dtype, seed: int = 0):
    """(k_cache, v_cache, block_tables): blocks scattered at random, NaN outside the contexts."""
    g = torch.Generator(device="cuda").manual_seed(seed)
    blocks_per_seq = [-(-c // block_size) for c in ctx_lens]
    num_blocks = sum(blocks_per_seq) + 3
    perm = torch.randperm(num_blocks, device="cuda", generator=g).to(torch.int32)
    tables = torch.zeros(len(ctx_lens), max(blocks_per_seq), dtype=torch.int32, device="cuda")
    start = 0
    for i, n in enumerate(blocks_per_seq):
        tables[i, :n] = perm[start:start + n]
        start += n
    pos = torch.arange(tables.shape[1] * block_size, device="cuda")
    slots = tables[:, pos // block_size].long() * block_size + pos % block_size
    valid = pos[None, :] < torch.tensor(ctx_lens, device="cuda")[:, None]
    slots = slots[valid]
    caches = []
    for _ in range(2):
        cache = torch.full((num_blocks, block_size, num_kv_heads, head_dim), float("nan"),
                           dtype=dtype, device="cuda")
        rows = torch.randn(len(slots), num_kv_heads, head_dim, device="cuda", generator=g)
        cache.view(-1, num_kv_heads, head_dim)[slots] = rows.to(dtype)
        caches.append(cache)
    return caches[0], caches[1], tables


def reference(q, k_cache, v_cache, tables, ctx_lens: list[int], scale: float) -> torch.Tensor:
    """fp64 attention of each query over its own context, 16 sequences at a time."""
    num_seqs, num_heads, head_dim = q.shape
    kvh = k_cache.shape[2]
    out = torch.empty(num_seqs, num_heads, head_dim, dtype=torch.float64, device=q.device)
    lens = torch.tensor(ctx_lens, device=q.device)
    for s in range(0, num_seqs, 16):
        sl = slice(s, s + 16)
        n, max_len = len(ctx_lens[sl]), max(ctx_lens[sl])
        k = gather_kv(k_cache, tables[sl], max_len).double().nan_to_num()  # [n, L, kvh, d]
        v = gather_kv(v_cache, tables[sl], max_len).double().nan_to_num()
        qq = q[sl].double().view(n, kvh, num_heads // kvh, head_dim)
        scores = torch.einsum("nhgd,nlhd->nhgl", qq, k) * scale
        mask = torch.arange(max_len, device=q.device)[None, :] < lens[sl, None]
        scores = scores.masked_fill(~mask[:, None, None, :], float("-inf"))
        o = torch.einsum("nhgl,nlhd->nhgd", scores.softmax(-1), v)
        out[sl] = o.reshape(n, num_heads, head_dim)
    return out


def run_decode(ctx_lens, group, head_dim, block_size, dtype, num_kv_heads=NUM_KV_HEADS,
               seed=0, **kw):
    k_cache, v_cache, tables = make_cache(ctx_lens, num_kv_heads, head_dim, block_size, dtype,
                                          seed)
    g = torch.Generator(device="cuda").manual_seed(seed + 1)
    q = torch.randn(len(ctx_lens), num_kv_heads * group, head_dim, device="cuda",
                    generator=g).to(dtype)
    lens = torch.tensor(ctx_lens, dtype=torch.int32, device="cuda")
    scale = kw.pop("scale", head_dim**-0.5)
    out = torch.full_like(q, float("nan"))
    got = cuda_ops.paged_decode(q, k_cache, v_cache, tables, lens, scale, out=out, **kw)
    assert got is out
    ref = reference(q, k_cache, v_cache, tables, ctx_lens, scale)
    assert not out.isnan().any(), "output left unwritten (or NaN from the poisoned cache)"
    tol = TOLERANCE[dtype]
    torch.testing.assert_close(out.double(), ref, atol=tol, rtol=tol)
    return q, k_cache, v_cache, tables, lens, out


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("group", [1, 4, 6, 8])
@pytest.mark.parametrize("block_size", [16, 32])
@pytest.mark.parametrize("head_dim", [64, 128])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("warps", [4, 8])
def test_paged_decode_matches_fp64(shape, group, block_size, head_dim, dtype, warps):
    run_decode(_lengths(shape), group, head_dim, block_size, dtype, warps=warps)


@pytest.mark.parametrize("group", [2, 12, 16])  # 12 and 16: the 16-row variant
@pytest.mark.parametrize("head_dim", [64, 128])
@pytest.mark.parametrize("warps", [4, 8])
def test_paged_decode_other_groups(group, head_dim, warps):
    for dtype in (torch.bfloat16, torch.float16):
        run_decode(_lengths("ragged_edges"), group, head_dim, 16, dtype, warps=warps)


def test_paged_decode_eight_kv_heads():  # a 70B-like layer: 64 query heads over 8 KV heads
    run_decode([4096] * 8 + [3, 700], 8, 128, 16, torch.bfloat16, num_kv_heads=8)


@pytest.mark.parametrize("num_splits", [1, 2, 7, 64, 256])
@pytest.mark.parametrize("min_chunk", [64, 256, 1024])
@pytest.mark.parametrize("warps", [4, 8])
def test_paged_decode_splits(num_splits, min_chunk, warps):
    run_decode(_lengths("b37_ragged_3k") + [9000], 6, 128, 16, torch.bfloat16,
               num_splits=num_splits, min_chunk=min_chunk, warps=warps)


def test_paged_decode_refuses_other_warp_counts():
    with pytest.raises(RuntimeError, match="warps 6 is not built"):
        run_decode([100], 6, 128, 16, torch.bfloat16, warps=6)


def test_paged_decode_scale_and_determinism():
    args = (_lengths("b37_ragged_3k"), 4, 128, 32, torch.float16)
    q, k_cache, v_cache, tables, lens, out = run_decode(*args, scale=0.3)
    again = cuda_ops.paged_decode(q, k_cache, v_cache, tables, lens, 0.3)
    assert torch.equal(out, again)  # chunks are combined in a fixed order: the same bits


def test_paged_decode_leaves_split_counters_zero():
    run_decode(_lengths("b256_ragged_1k"), 8, 128, 16, torch.bfloat16, num_splits=16,
               min_chunk=64)
    counters = cuda_ops._split_counters(1, torch.device("cuda", torch.cuda.current_device()))
    assert int(counters.abs().sum()) == 0


def test_paged_decode_zero_context_gives_zeros():  # padding rows of a CUDA graph batch
    k_cache, v_cache, tables = make_cache([300, 1, 5], NUM_KV_HEADS, 128, 16, torch.bfloat16)
    q = torch.randn(3, 8, 128, device="cuda").bfloat16()
    lens = torch.tensor([300, 0, 5], dtype=torch.int32, device="cuda")
    out = torch.full_like(q, float("nan"))
    cuda_ops.paged_decode(q, k_cache, v_cache, tables, lens, 0.1, out=out, num_splits=4,
                          min_chunk=64)
    assert int((out[1] != 0).sum()) == 0 and not out.isnan().any()
    ref = reference(q[[0, 2]], k_cache, v_cache, tables[[0, 2]], [300, 5], 0.1)
    torch.testing.assert_close(out[[0, 2]].double(), ref, atol=1e-2, rtol=1e-2)


def check_graph_replays(cases: list[list[int]], order: tuple[int, ...], **kw) -> None:
    """paged_decode(**kw) captured once in a CUDA graph over static buffers; then, for each i
    of `order`, the caches, tables and context lengths of cases[i] written in place and the
    graph replayed: the output must be case i's attention."""
    made = [make_cache(c, NUM_KV_HEADS, 128, 16, torch.bfloat16, seed=i)
            for i, c in enumerate(cases)]
    num_blocks = max(k.shape[0] for k, _, _ in made)
    width = max(t.shape[1] for _, _, t in made)
    k_cache = torch.zeros(num_blocks, *made[0][0].shape[1:], dtype=torch.bfloat16,
                          device="cuda")
    v_cache = torch.zeros_like(k_cache)
    tables = torch.zeros(len(cases[0]), width, dtype=torch.int32, device="cuda")
    lens = torch.zeros(len(cases[0]), dtype=torch.int32, device="cuda")
    q = torch.randn(len(cases[0]), 12, 128, device="cuda").bfloat16()
    out = torch.empty_like(q)

    def load(i: int) -> None:
        k, v, t = made[i]
        k_cache[: k.shape[0]].copy_(k)
        v_cache[: v.shape[0]].copy_(v)
        tables.zero_()
        tables[:, : t.shape[1]].copy_(t)
        lens.copy_(torch.tensor(cases[i], dtype=torch.int32))

    def call() -> None:
        cuda_ops.paged_decode(q, k_cache, v_cache, tables, lens, 0.1, out=out, **kw)

    load(0)
    call()  # warm-up
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        call()
    for i in order:
        load(i)
        graph.replay()
        k, v, t = made[i]
        ref = reference(q, k, v, t, cases[i], 0.1)
        torch.testing.assert_close(out.double(), ref, atol=1e-2, rtol=1e-2)


def test_paged_decode_in_a_cuda_graph():
    """Captured once; other context lengths and block tables written in place, then replayed:
    the grid does not depend on any context length."""
    check_graph_replays([[40, 700, 3000, 1], [2500, 1, 64, 4100]], (1, 0, 1))


def test_paged_decode_layer_views():
    """q a slice of a fused qkv row, caches a layer's K and V of one 6-D pool."""
    num_seqs, group, d, bs = 9, 6, 128, 16
    ctx_lens = [random.Random(3).randint(1, 900) for _ in range(num_seqs)]
    k_cache, v_cache, tables = make_cache(ctx_lens, NUM_KV_HEADS, d, bs, torch.bfloat16)
    pool = torch.zeros(3, 2, *k_cache.shape, dtype=torch.bfloat16, device="cuda")
    pool[1, 0], pool[1, 1] = k_cache, v_cache
    heads = NUM_KV_HEADS * group
    qkv = torch.randn(num_seqs, (heads + 2 * NUM_KV_HEADS) * d, device="cuda").bfloat16()
    q = qkv[:, : heads * d].view(num_seqs, heads, d)
    lens = torch.tensor(ctx_lens, dtype=torch.int32, device="cuda")
    out = cuda_ops.paged_decode(q, pool[1, 0], pool[1, 1], tables, lens, d**-0.5)
    ref = reference(q, k_cache, v_cache, tables, ctx_lens, d**-0.5)
    torch.testing.assert_close(out.double(), ref, atol=1e-2, rtol=1e-2)


def test_paged_decode_refuses_unbuilt_shapes():
    q = torch.zeros(1, 4, 80, dtype=torch.bfloat16, device="cuda")
    cache = torch.zeros(2, 16, 2, 80, dtype=torch.bfloat16, device="cuda")
    tables = torch.zeros(1, 1, dtype=torch.int32, device="cuda")
    lens = torch.ones(1, dtype=torch.int32, device="cuda")
    assert not cuda_ops.decode_supported(q, cache)
    assert cuda_ops.decode_supported(q[..., :64], cache[..., :64])
    with pytest.raises(RuntimeError, match="head_dim"):
        cuda_ops.paged_decode(q, cache, cache, tables, lens, 0.1)


BAD_CALLS = """
import sys
import torch
from services.worker.ops import cuda_ops
ops, dev = cuda_ops._ops(), "cuda"
bf = {"dtype": torch.bfloat16, "device": dev}
q, cache = torch.zeros(1, 4, 80, **bf), torch.zeros(2, 16, 2, 80, **bf)
tables = torch.zeros(1, 1, dtype=torch.int32, device=dev)
lens = torch.ones(1, dtype=torch.int32, device=dev)
none = torch.empty(0, device=dev)
q64, cache64 = q[..., :64], cache[..., :64]
key, pool = torch.zeros(3, 2, 80, **bf), torch.zeros(1, 2, 4, 16, 2, 64, **bf)
calls = [
    lambda: ops.paged_decode(q, q, cache, cache, tables, lens, none, none, none, none, 0.1, 1,
                             64, False, 4),
    lambda: ops.paged_decode(q[..., :64].cpu(), q[..., :64], cache, cache, tables, lens, none,
                             none, none, none, 0.1, 1, 64, True, 4),
    lambda: ops.paged_decode(q64, q64, cache64, cache64, tables, lens, none, none, none, none,
                             0.1, 1, 64, False, 6),
    lambda: ops.store_kv(key, key, cache, cache, torch.zeros(3, dtype=torch.int32, device=dev)),
    lambda: ops.copy_blocks(pool, pool, torch.zeros(2, dtype=torch.int64, device=dev),
                            torch.zeros(3, dtype=torch.int64, device=dev)),
]
errors = []
for i, call in enumerate(calls):
    print("call", i, file=sys.stderr, flush=True)
    errors.append(call())
    print("returned", repr(errors[-1]), file=sys.stderr, flush=True)
assert all(errors), errors
print("|".join(errors), flush=True)
"""


def test_bindings_return_errors_instead_of_crashing():
    """Straight to the extension, past the Python checks: every bad call returns its error
    (a C++ exception once killed the process); run in a child so a crash fails this test."""
    from tests.gpu.child import errors_of

    errors = errors_of(BAD_CALLS)
    assert "head_dim 80" in errors[0] and "must be a CUDA tensor" in errors[1]
    assert "warps 6 is not built" in errors[2]
    assert "slot_mapping" in errors[3] and "src_ids and dst_ids" in errors[4]


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    return torch.equal(a.contiguous().view(torch.uint8), b.contiguous().view(torch.uint8))


@pytest.mark.parametrize("num_tokens", [1, 37, 1000])
@pytest.mark.parametrize("num_kv_heads,head_dim", [(1, 64), (2, 128), (8, 128)])
@pytest.mark.parametrize("block_size", [16, 32])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_store_kv_bitwise(num_tokens, num_kv_heads, head_dim, block_size, dtype):
    g = torch.Generator(device="cuda").manual_seed(num_tokens)
    num_blocks = 80
    pool = torch.randn(2, 2, num_blocks, block_size, num_kv_heads, head_dim, device="cuda",
                       generator=g).to(dtype)
    expected = pool.clone()
    width = (4 + 2 * num_kv_heads) * head_dim  # k, v: strided views of a fused qkv row
    qkv = torch.randn(num_tokens, width, device="cuda", generator=g).to(dtype)
    k = qkv[:, 4 * head_dim:(4 + num_kv_heads) * head_dim].view(-1, num_kv_heads, head_dim)
    v = qkv[:, (4 + num_kv_heads) * head_dim:].view(-1, num_kv_heads, head_dim)
    slots = torch.randperm(num_blocks * block_size, device="cuda", generator=g)[:num_tokens]
    cuda_ops.store_kv(k, v, pool[1, 0], pool[1, 1], slots)
    store_kv_reference(k, v, expected[1, 0], expected[1, 1], slots)
    assert same_bits(pool, expected)


def test_store_kv_skips_negative_slots():
    pool = torch.zeros(2, 4, 16, 2, 64, dtype=torch.bfloat16, device="cuda")
    k = torch.randn(3, 2, 64, device="cuda").bfloat16()
    slots = torch.tensor([5, -1, 40], device="cuda")
    cuda_ops.store_kv(k, k, pool[0], pool[1], slots)
    flat = pool[0].view(-1, 2, 64)
    assert same_bits(flat[5], k[0]) and same_bits(flat[40], k[2])
    assert int((pool != 0).sum()) == 2 * 2 * 2 * 64


def _pool(num_blocks: int, device: str, dtype=torch.bfloat16, layers: int = 5) -> torch.Tensor:
    pool = torch.empty(layers, 2, num_blocks, 16, 2, 128, dtype=dtype, device=device)
    pool.view(torch.uint8).random_()
    return pool


@pytest.mark.parametrize("num_pairs", [1, 7, 300])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_copy_blocks_bitwise_same_gpu(num_pairs, dtype):
    rng = random.Random(num_pairs)
    src, dst = _pool(400, "cuda", dtype), _pool(333, "cuda", dtype)
    src_ids, dst_ids = rng.sample(range(400), num_pairs), rng.sample(range(333), num_pairs)
    original = dst.clone()
    expected = dst.clone()
    cuda_ops.copy_blocks_reference(src, expected, src_ids, dst_ids)
    cuda_ops.copy_blocks(src, dst, src_ids, dst_ids)
    assert same_bits(dst, expected)
    dst = original  # ids given as device tensors instead: the same result
    cuda_ops.copy_blocks(src, dst, torch.tensor(src_ids, device="cuda"),
                         torch.tensor(dst_ids, device="cuda"))
    assert same_bits(dst, expected)


def test_copy_blocks_within_one_pool():  # copy-on-write: ModelRunner.copy_blocks
    pool = _pool(64, "cuda")
    expected = pool.clone()
    cuda_ops.copy_blocks_reference(expected, expected, [3, 9, 10], [50, 2, 11])
    cuda_ops.copy_blocks(pool, pool, [3, 9, 10], [50, 2, 11])
    assert same_bits(pool, expected)


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 GPUs")
def test_copy_blocks_bitwise_across_gpus():
    if not torch.cuda.can_device_access_peer(0, 1):
        pytest.skip("cuda:0 cannot access cuda:1 (no P2P)")
    rng = random.Random(1)
    src = _pool(512, "cuda:1", layers=28)  # the prefill worker's pool, read over NVLink
    dst = _pool(512, "cuda:0", layers=28)
    src_ids, dst_ids = rng.sample(range(512), 200), rng.sample(range(512), 200)
    expected = dst.clone()
    cuda_ops.copy_blocks_reference(src, expected, src_ids, dst_ids)
    with torch.cuda.device(0):
        cuda_ops.copy_blocks(src, dst, src_ids, dst_ids)
        torch.cuda.synchronize()
    assert same_bits(dst, expected)
