"""csrc's decode-batch GEMV against an fp64 reference on fresh random inputs, its argument
errors, and the model's linear layers taking it. Skipped without CUDA or `make kernels`."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from services.worker.ops import cuda_ops, gemv_ops

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
    root = Path(__file__).resolve().parents[2]
    r = subprocess.run([sys.executable, "-X", "faulthandler", "-c", BAD_CALLS],
                       capture_output=True, text=True, cwd=root, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    errors = r.stdout.strip().split("|")
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
