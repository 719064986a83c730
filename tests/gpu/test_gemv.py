"""csrc's decode-batch GEMV against an fp64 reference on fresh random inputs, its argument
errors, and the model's linear layers taking it. Skipped without CUDA or `make kernels`."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from services.worker.ops import cuda_ops, gemv_ops
from tests.gpu.batches import random_decode_batch
from tests.gpu.child import PRELUDE, errors_of

pytestmark = pytest.mark.skipif(
    not torch.cuda.is_available() or cuda_ops.load() is None
    or not hasattr(cuda_ops.load(), "gemv"), reason="needs CUDA and `make kernels`")

SHAPES = [(1, 8), (7, 72), (300, 4104), (1537, 1000), (2048, 1536), (1536, 8960)]  # (n, k)
ULP = {torch.bfloat16: 2.0**-7, torch.float16: 2.0**-10}  # relative spacing, at most


def check(out: torch.Tensor, x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None) -> None:
    """Within one unit in the last place of the fp64 result (the kernel rounds once, from fp32
    sums), plus fp32 summation error."""
    ref = x.double() @ w.double().T + (0 if b is None else b.double())
    scale = x.double().abs() @ w.double().abs().T
    tol = ref.abs() * ULP[out.dtype] + scale * 1e-6 + 1e-30
    err = (out.double() - ref).abs()
    assert torch.isfinite(out).all()
    assert (err <= tol).all(), f"max error {(err / tol).max():.2f} tolerances"


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("n,k", SHAPES)
@pytest.mark.parametrize("rows", range(1, gemv_ops.GEMV_MAX_ROWS + 1))
def test_gemv_matches_fp64(rows, n, k, dtype):
    g = torch.Generator(device="cuda").manual_seed(rows * 7919 + n * 31 + k)
    x = torch.randn(rows, k, device="cuda", generator=g).to(dtype)
    w = (torch.randn(n, k, device="cuda", generator=g) * k**-0.5).to(dtype)
    b = torch.randn(n, device="cuda", generator=g).to(dtype) if (n + rows) % 2 else None
    out = torch.full((rows, n), float("nan"), dtype=dtype, device="cuda")  # poisoned
    gemv_ops.gemv(x, w, b, out=out)
    check(out, x, w, b)


@pytest.mark.parametrize("rows", [1, 3, 8])
def test_gemv_strided_rows_and_bias(rows):
    """x a column slice of a wider tensor (row stride > k), w a row slice of a wider weight,
    out a column slice: strides are honoured and nothing outside is written."""
    dtype = torch.bfloat16
    wide = torch.randn(rows, 1536 + 64, device="cuda").to(dtype)
    x = wide[:, 64:]
    w_wide = torch.randn(1000, 1536 + 16, device="cuda").to(dtype) * 0.03
    w = w_wide[:, :1536]
    b = torch.randn(1000, device="cuda").to(dtype)
    out_wide = torch.zeros(rows, 1008, dtype=dtype, device="cuda")
    out = out_wide[:, :1000]
    gemv_ops.gemv(x, w, b, out=out)
    check(out, x, w, b)
    assert not out_wide[:, 1000:].any()


def test_linear_takes_the_kernel_for_decode_batches_only(monkeypatch):
    calls = []
    real = gemv_ops.gemv
    monkeypatch.setattr(gemv_ops, "gemv", lambda *a, **kw: calls.append(a) or real(*a, **kw))
    lin = gemv_ops.Linear(256, 512, bias=True).to("cuda", torch.bfloat16)
    for rows, takes in ((1, True), (gemv_ops.LINEAR_MAX_ROWS, True),
                        (gemv_ops.LINEAR_MAX_ROWS + 1, False), (64, False)):
        calls.clear()
        x = torch.randn(rows, 256, device="cuda", dtype=torch.bfloat16)
        y = lin(x)
        assert bool(calls) == takes
        torch.testing.assert_close(y, F.linear(x, lin.weight, lin.bias), atol=3e-2, rtol=2e-2)
    monkeypatch.setenv("NANOPD_GEMV", "0")
    calls.clear()
    lin(torch.randn(1, 256, device="cuda", dtype=torch.bfloat16))
    assert not calls
    x32 = torch.randn(1, 256, device="cuda")
    lin32 = gemv_ops.Linear(256, 512).to("cuda")
    torch.testing.assert_close(lin32(x32), F.linear(x32, lin32.weight, lin32.bias))


def test_gemv_refuses_what_it_cannot_take():
    x = torch.randn(9, 64, device="cuda", dtype=torch.bfloat16)
    w = torch.randn(32, 64, device="cuda", dtype=torch.bfloat16)
    with pytest.raises(ValueError, match="gemv takes"):
        gemv_ops.gemv(x, w)
    with pytest.raises(ValueError, match="gemv takes"):
        gemv_ops.gemv(x[:1, :60], w[:, :60])


BAD_CALLS = PRELUDE + """
x, w, out = torch.zeros(9, 64, **bf), torch.zeros(32, 64, **bf), torch.zeros(9, 32, **bf)
errors = [
    ops.gemv(out, x, w, none),                                   # 9 rows
    ops.gemv(out[:1], x[:1], w[:, :32], none),                   # k mismatch
    ops.gemv(out[:1], x[:1].float(), w, none),                   # dtype
    ops.gemv(out[:1], x[:1], w, torch.zeros(31, **bf)),          # bias shape
    ops.gemv(out[:1], x[:1, :60], w[:, :60], none),              # k not a multiple of 8
]
assert all(errors), errors
print("|".join(errors))
"""


def test_gemv_binding_returns_errors_instead_of_crashing():
    errors = errors_of(BAD_CALLS)
    assert "1 to 8 rows" in errors[0] and "expected [n, 64]" in errors[1]
    assert "float16 or bfloat16" in errors[2] and "bias must be contiguous [32]" in errors[3]
    assert "multiple of 8" in errors[4]


def test_decode_step_logits_with_and_without_the_kernel(tmp_path, monkeypatch):
    """A bf16 decode step of 1-2 sequences (eager): logits through the GEMV agree with
    cuBLAS's within bf16 rounding, and mostly the same argmax."""
    import random

    from services.worker.engine import LLM
    from services.worker.models.random_model import tiny_test_model

    path = tiny_test_model("small-qwen3", tmp_path, None)
    llm = LLM(str(path), device="cuda:0", dtype="bfloat16", num_kv_blocks=256,
              enforce_eager=True)
    runner = llm.engine.runner
    runner.kv_pool.normal_()
    rng = random.Random(5)
    for n in (1, 2):
        batch = random_decode_batch(rng, n, 256, 200)
        ours = runner.run(batch, list(range(n))).float().clone()
        monkeypatch.setenv("NANOPD_GEMV", "0")
        cublas = runner.run(batch, list(range(n))).float()
        monkeypatch.delenv("NANOPD_GEMV")
        # the GEMV rounds each output once from its own fp32 order: a bf16 ulp of difference
        # per projection, grown over the layers; logits agree within 2% of their range
        assert (ours - cublas).abs().max() <= 0.02 * cublas.abs().max()
        assert (ours.argmax(-1) == cublas.argmax(-1)).float().mean() >= 0.6


# the GEMV with the next kernel in its epilogue (csrc/gemv_fused.cu)
needs_fused = pytest.mark.skipif(
    not hasattr(cuda_ops.load(), "gemv_silu_and_mul"),
    reason="kernels built before gemv_fused.cu")


@needs_fused
@pytest.mark.parametrize("rows", [1, 2])
@pytest.mark.parametrize("n,k", [(17920, 1536), (24576, 4096), (32, 72)])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_silu_and_mul_epilogue_is_bitwise_the_two_kernels(rows, n, k, dtype):
    """linear_silu_and_mul == fused_ops.silu_and_mul(gemv(...)) bitwise: each column's sum is
    made in the same order whichever warp makes it, then rounded as the GEMV's output."""
    from services.worker.ops import fused_ops

    g = torch.Generator(device="cuda").manual_seed(rows * 3 + n + k)
    x = torch.randn(rows, k, device="cuda", generator=g).to(dtype)
    w = (torch.randn(n, k, device="cuda", generator=g) * k**-0.5).to(dtype)
    b = torch.randn(n, device="cuda", generator=g).to(dtype) if rows == 2 else None
    out = gemv_ops.linear_silu_and_mul(x, w, b)
    assert out.shape == (rows, n // 2)
    assert torch.equal(out, fused_ops.silu_and_mul(gemv_ops.gemv(x, w, b)))


@needs_fused
@pytest.mark.parametrize("rows", [1, 2])
@pytest.mark.parametrize("heads", [(12, 2, 128), (16, 8, 64), (56, 8, 128), (4, 1, 16)])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_rotary_epilogue_is_bitwise_the_two_kernels(rows, heads, dtype):
    """linear_rotary_store_kv == gemv then fused_ops.rotary_store_kv, bitwise: qkv (q and k
    rotated, NaN where a position is past the tables) and both caches (a negative slot writes
    nothing); (56, 8, 128) is wide enough for 4 columns per warp."""
    from services.worker.ops import fused_ops

    num_heads, num_kv_heads, head_dim = heads
    hidden, n = 1024, (num_heads + 2 * num_kv_heads) * head_dim
    g = torch.Generator(device="cuda").manual_seed(rows * 101 + n + head_dim)
    x = torch.randn(rows, hidden, device="cuda", generator=g).to(dtype)
    w = (torch.randn(n, hidden, device="cuda", generator=g) * hidden**-0.5).to(dtype)
    b = torch.randn(n, device="cuda", generator=g).to(dtype) if num_heads % 3 else None
    table = torch.rand(64, head_dim, device="cuda", generator=g)
    cos, sin = table.cos().contiguous(), table.sin().contiguous()
    positions = torch.tensor([5, 64][:rows], device="cuda")  # 64: past the tables
    slots = torch.tensor([17, -1][:rows], device="cuda")
    caches = [torch.randn(4, 16, num_kv_heads, head_dim, device="cuda",
                          generator=g).to(dtype) for _ in range(2)]
    ours_caches = [c.clone() for c in caches]
    ours = gemv_ops.linear_rotary_store_kv(x, w, b, positions, cos, sin, num_heads,
                                           num_kv_heads, head_dim, *ours_caches, slots)
    ref = gemv_ops.gemv(x, w, b)
    fused_ops.rotary_store_kv(ref, positions, cos, sin, num_heads, num_kv_heads, head_dim,
                              *caches, slots)
    torch.testing.assert_close(ours, ref, rtol=0, atol=0, equal_nan=True)
    for mine, theirs in zip(ours_caches, caches, strict=True):
        assert torch.equal(mine, theirs)


ROTARY_BAD_CALLS = PRELUDE + """
x, w, qkv = torch.zeros(1, 64, **bf), torch.zeros(64, 64, **bf), torch.zeros(1, 64, **bf)
table = torch.zeros(8, 16, device="cuda")
cache = torch.zeros(2, 16, 1, 16, **bf)
pos = torch.zeros(1, dtype=torch.long, device="cuda")
errors = [  # the width first
    ops.gemv_rotary(qkv, x, w, none, pos, table, table, cache, cache, pos, 3, 1, 16, *no_norm),
    ops.gemv_rotary(qkv, x, w, none, pos.int(), table, table, cache, cache, pos, 2, 1, 16,
                    *no_norm),
    ops.gemv_rotary(qkv, x, w, none, pos, table.half(), table, cache, cache, pos, 2, 1, 16,
                    *no_norm),
]
assert all(errors), errors
print("|".join(errors))
"""


@needs_fused
def test_gemv_rotary_binding_returns_errors_instead_of_crashing():
    errors = errors_of(ROTARY_BAD_CALLS)
    assert "qkv must be [num_tokens, 80]" in errors[0]
    assert "positions must be contiguous int64" in errors[1]
    assert "cos and sin must be contiguous float32" in errors[2]


@needs_fused
@pytest.mark.parametrize("shape", ["small-qwen3", "small-llama"])
def test_fused_decode_layers_are_bitwise_the_unfused_ones(tmp_path, monkeypatch, shape):
    """A bf16 decode step of one sequence takes the fused GEMVs (eager and inside CUDA
    graphs): SiLU-and-mul in gate_up's and (no q/k norm: small-llama) rotary + KV store in
    qkv's; its logits are bitwise the unfused path's (NANOPD_GEMV_FUSE=0). Two sequences
    take the unfused path. (The norms split around the GEMVs are not bitwise:
    NANOPD_GEMV_NORM=0 here, test_gemv_norm.py for them.)"""
    import random

    from services.worker.engine import LLM, SamplingParams
    from services.worker.models.random_model import tiny_test_model

    monkeypatch.setenv("NANOPD_GEMV_NORM", "0")
    path = tiny_test_model(shape, tmp_path, None)
    calls = []
    names = ["linear_silu_and_mul"]
    if shape == "small-llama":
        names.append("linear_rotary_store_kv")
    for name in names:
        real = getattr(gemv_ops, name)
        monkeypatch.setattr(gemv_ops, name, lambda *a, real=real, name=name, **kw:
                            calls.append(name) or real(*a, **kw))
    monkeypatch.delenv("NANOPD_GEMV_FUSE", raising=False)
    llm = LLM(str(path), device="cuda:0", dtype="bfloat16", num_kv_blocks=256)
    assert llm.engine.runner.graphs is not None  # captured with the fused paths
    assert set(calls) == set(names)
    out = llm.generate([[1, 2, 3], [4, 5, 6, 7]],
                       SamplingParams(temperature=0, max_tokens=8, ignore_eos=True))
    assert [len(o.token_ids) for o in out] == [8, 8]
    runner = llm.engine.runner
    runner.graphs = None  # eager from here
    runner.kv_pool.normal_()
    rng = random.Random(6)
    for n in (1, 2):
        batch = random_decode_batch(rng, n, 256, 200)
        calls.clear()
        fused = runner.run(batch, list(range(n))).float().clone()
        assert set(calls) == (set(names) if n <= gemv_ops.FUSE_MAX_ROWS else set())
        monkeypatch.setenv("NANOPD_GEMV_FUSE", "0")
        plain = runner.run(batch, list(range(n))).float()
        monkeypatch.delenv("NANOPD_GEMV_FUSE")
        assert torch.equal(fused, plain)


BAD_FUSED_CALLS = PRELUDE + """
x, w, out = torch.zeros(2, 64, **bf), torch.zeros(32, 64, **bf), torch.zeros(2, 16, **bf)
errors = [
    ops.gemv_silu_and_mul(out, torch.zeros(3, 64, **bf), w, none, *no_norm),  # rows
    ops.gemv_silu_and_mul(torch.zeros(2, 32, **bf), x, w, none, *no_norm),  # not [rows, n/2]
    ops.gemv_silu_and_mul(out, x, w[:31], none, *no_norm),  # odd n
]
assert all(errors), errors
print("|".join(errors))
"""


@needs_fused
def test_gemv_silu_and_mul_binding_returns_errors_instead_of_crashing():
    errors = errors_of(BAD_FUSED_CALLS)
    assert "1 to 2 rows" in errors[0] and "expected [2, 16]" in errors[1]
    assert "must be even" in errors[2]
