"""csrc's decode-batch GEMV against an fp64 reference on fresh random inputs, its argument
errors, and the model's linear layers taking it. Skipped without CUDA or `make kernels`."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from services.worker.ops import cuda_ops, gemv_ops
from tests.gpu.child import errors_of

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


BAD_CALLS = """
import torch
from services.worker.ops import cuda_ops
ops = cuda_ops._ops()
bf = {"dtype": torch.bfloat16, "device": "cuda"}
none = torch.empty(0, device="cuda")
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
        free = rng.sample(range(256), 256)
        batch = []
        for _ in range(n):
            ctx = rng.randint(1, 200)
            batch.append(([rng.randrange(500)], ctx - 1, ctx,
                          [free.pop() for _ in range(-(-ctx // 16))]))
        ours = runner.run(batch, list(range(n))).float().clone()
        monkeypatch.setenv("NANOPD_GEMV", "0")
        cublas = runner.run(batch, list(range(n))).float()
        monkeypatch.delenv("NANOPD_GEMV")
        # the GEMV rounds each output once from its own fp32 order: a bf16 ulp of difference
        # per projection, grown over the layers; logits agree within 2% of their range
        assert (ours - cublas).abs().max() <= 0.02 * cublas.abs().max()
        assert (ours.argmax(-1) == cublas.argmax(-1)).float().mean() >= 0.6


# the GEMV with the layer's add + RMSNorm or SwiGLU made inside it (csrc/gemv_fused.cu)
needs_prologue = pytest.mark.skipif(
    not hasattr(cuda_ops.load(), "gemv_prologue"), reason="kernels built before gemv_fused.cu")


@needs_prologue
@pytest.mark.parametrize("rows", [1, 2])
@pytest.mark.parametrize("n,k", [(2048, 1536), (17920, 1536), (40, 16384), (7, 64)])
@pytest.mark.parametrize("with_residual", [True, False])
def test_add_norm_linear_matches_its_reference(rows, n, k, with_residual):
    from services.worker.ops.fused_reference import (
        fused_add_rms_norm_reference,
        rms_norm_reference,
    )

    dtype, eps = torch.bfloat16, 1e-6
    g = torch.Generator(device="cuda").manual_seed(rows + n + k)
    x = torch.randn(rows, k, device="cuda", generator=g).to(dtype)
    residual = torch.randn(rows, k, device="cuda", generator=g).to(dtype)
    norm_w = (1 + 0.1 * torch.randn(k, device="cuda", generator=g)).to(dtype)
    w = (torch.randn(n, k, device="cuda", generator=g) * k**-0.5).to(dtype)
    b = torch.randn(n, device="cuda", generator=g).to(dtype)
    x0, r0 = x.clone(), residual.clone()
    out, res_out = gemv_ops.add_norm_linear(x, residual if with_residual else None, norm_w,
                                            eps, w, b)
    if with_residual:
        normed, ref_res = fused_add_rms_norm_reference(x0, r0, norm_w, eps)
        assert torch.equal(res_out, ref_res)  # bitwise: round(x + residual)
        assert res_out.data_ptr() not in (x.data_ptr(), residual.data_ptr())
    else:
        normed = rms_norm_reference(x0, norm_w, eps)
        assert res_out is x
    assert torch.equal(x, x0) and torch.equal(residual, r0)  # inputs untouched
    # the normalized x may differ from the reference's by an ulp where the mean of squares,
    # summed in another order, moves a rounding: allow that on top of check()'s bound
    ref = normed.double() @ w.double().T + b.double()
    scale = normed.double().abs() @ w.double().abs().T
    err = (out.double() - ref).abs()
    assert (err <= ref.abs() * ULP[dtype] + scale * 2.0**-8 + 1e-30).all()


@needs_prologue
@pytest.mark.parametrize("rows", [1, 2])
@pytest.mark.parametrize("n,k", [(1536, 8960), (4096, 12288), (9, 72)])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_swiglu_linear_matches_its_reference(rows, n, k, dtype):
    from services.worker.ops.fused_reference import silu_and_mul_reference

    g = torch.Generator(device="cuda").manual_seed(rows * 3 + n + k)
    gate_up = torch.randn(rows, 2 * k, device="cuda", generator=g).to(dtype)
    w = (torch.randn(n, k, device="cuda", generator=g) * k**-0.5).to(dtype)
    out = gemv_ops.swiglu_linear(gate_up, w)
    check(out, silu_and_mul_reference(gate_up), w, None)  # x exact: the GEMV's own bound


@needs_prologue
def test_fused_decode_layers_agree_with_the_unfused_ones(tmp_path, monkeypatch):
    """NANOPD_GEMV_FUSE=1: a bf16 decode step of 1-2 sequences takes the fused GEMVs (eager
    and inside CUDA graphs) and its logits agree with the unfused path's."""
    import random

    from services.worker.engine import LLM, SamplingParams
    from services.worker.models.random_model import tiny_test_model

    path = tiny_test_model("small-qwen3", tmp_path, None)
    calls = []
    real = gemv_ops.add_norm_linear
    monkeypatch.setattr(gemv_ops, "add_norm_linear",
                        lambda *a, **kw: calls.append(1) or real(*a, **kw))
    monkeypatch.setenv("NANOPD_GEMV_FUSE", "1")
    llm = LLM(str(path), device="cuda:0", dtype="bfloat16", num_kv_blocks=256)
    assert llm.engine.runner.graphs is not None and calls  # captured with the fused path
    out = llm.generate([[1, 2, 3], [4, 5, 6, 7]],
                       SamplingParams(temperature=0, max_tokens=8, ignore_eos=True))
    assert [len(o.token_ids) for o in out] == [8, 8]
    runner = llm.engine.runner
    runner.graphs = None  # eager from here
    runner.kv_pool.normal_()
    rng = random.Random(6)
    for n in (1, 2):
        free = rng.sample(range(256), 256)
        batch = [([rng.randrange(500)], c - 1, c, [free.pop() for _ in range(-(-c // 16))])
                 for c in (rng.randint(1, 200) for _ in range(n))]
        calls.clear()
        fused = runner.run(batch, list(range(n))).float().clone()
        assert calls
        monkeypatch.setenv("NANOPD_GEMV_FUSE", "0")
        plain = runner.run(batch, list(range(n))).float()
        monkeypatch.setenv("NANOPD_GEMV_FUSE", "1")
        assert (fused - plain).abs().max() <= 0.02 * plain.abs().max()
        assert (fused.argmax(-1) == plain.argmax(-1)).float().mean() >= 0.5


BAD_PROLOGUE_CALLS = """
import torch
from services.worker.ops import cuda_ops
ops = cuda_ops._ops()
bf = {"dtype": torch.bfloat16, "device": "cuda"}
none = torch.empty(0, device="cuda")
x, w, out, nw = (torch.zeros(2, 64, **bf), torch.zeros(32, 64, **bf), torch.zeros(2, 32, **bf),
                 torch.zeros(64, **bf))
errors = [
    ops.gemv_prologue(out, x, w, none, none, none, nw, 1e-6, 3),           # mode
    ops.gemv_prologue(out, torch.zeros(3, 64, **bf), w, none, none, none, nw, 1e-6, 1),  # rows
    ops.gemv_prologue(out, x, w, none, x.clone(), none, nw, 1e-6, 1),      # no residual_out
    ops.gemv_prologue(out, x, w, none, x.clone(), x, nw, 1e-6, 1),         # aliasing x
    ops.gemv_prologue(out, x, w, none, none, none, nw, 1e-6, 2),           # swiglu: x not 2k
    ops.gemv_prologue(out, x, w, none, none, none, nw[:32], 1e-6, 1),      # norm weight
]
assert all(errors), errors
print("|".join(errors))
"""


@needs_prologue
def test_gemv_prologue_binding_returns_errors_instead_of_crashing():
    errors = errors_of(BAD_PROLOGUE_CALLS)
    assert "mode must be" in errors[0] and "1 to 2 rows" in errors[1]
    assert "both residual and residual_out" in errors[2] and "of its own" in errors[3]
    assert "expected [n, 32]" in errors[4] and "norm_weight must be" in errors[5]
