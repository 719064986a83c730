"""The add + RMSNorm split around the GEMVs (csrc/gemv_fused.cu ADD epilogue and NORM
prologue) against the kernels they replace, on fresh random inputs; its argument errors; and
the model's decode layers taking it. Skipped without CUDA or a `make kernels` that has it."""

from __future__ import annotations

import pytest
import torch

from services.worker.ops import cuda_ops, fused_ops, gemv_ops
from tests.gpu.batches import random_decode_batch
from tests.gpu.child import PRELUDE, errors_of

pytestmark = pytest.mark.skipif(
    not torch.cuda.is_available() or cuda_ops.load() is None
    or not hasattr(cuda_ops.load(), "gemv_add"), reason="needs CUDA and `make kernels`")

DTYPES = [torch.bfloat16, torch.float16]
EPS = 1e-6


def _rand(g: torch.Generator, *shape: int, scale: float = 1.0) -> torch.Tensor:
    return torch.randn(*shape, device="cuda", generator=g) * scale


def _sums_reference(residual: torch.Tensor) -> torch.Tensor:
    """fp64 sums of squares of each row's runs of SUM_COLUMNS columns."""
    rows, n = residual.shape
    pad = -n % gemv_ops.SUM_COLUMNS
    sq = torch.nn.functional.pad(residual.double().pow(2), (0, pad))
    return sq.view(rows, -1, gemv_ops.SUM_COLUMNS).sum(-1)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n,k", [(1536, 1536), (4096, 4096), (1001, 72), (8, 8960), (1536, 8960),
                                 (24, 4608)])
@pytest.mark.parametrize("rows", [1, 2])
def test_add_epilogue_is_the_add_with_its_sums_of_squares(rows, n, k, dtype):
    """gemv_add: the new residual is bitwise gemv then the dtype's add; each sum is the fp64
    sum of squares of its 8 columns within fp32 rounding; every sum is written (poisoned)."""
    g = torch.Generator(device="cuda").manual_seed(rows * 13 + n + k)
    x = _rand(g, rows, k).to(dtype)
    w = _rand(g, n, k, scale=k**-0.5).to(dtype)
    b = _rand(g, n).to(dtype) if n % 2 else None
    residual = _rand(g, rows, n).to(dtype)
    expected = gemv_ops.gemv(x, w, b) + residual
    sums = torch.full((rows, -(-n // 8)), float("nan"), device="cuda")
    err = cuda_ops._ops().gemv_add(residual, x, w, torch.empty(0) if b is None else b, sums)
    assert err == ""
    assert torch.equal(residual, expected)
    ref = _sums_reference(expected)
    assert torch.isfinite(sums).all()
    assert ((sums.double() - ref).abs() <= ref * 1e-6 + 1e-30).all()


def _exact_rows(g: torch.Generator, rows: int, k: int, dtype: torch.dtype) -> torch.Tensor:
    """Entries in {+-0.5, +-1, +-2}: every sum of their squares is exact in fp32, so the
    inverse RMS cannot depend on the order of the sum."""
    levels = torch.tensor([0.5, 1.0, 2.0], device="cuda")
    pick = torch.randint(0, 3, (rows, k), device="cuda", generator=g)
    sign = torch.randint(0, 2, (rows, k), device="cuda", generator=g) * 2 - 1
    return (levels[pick] * sign).to(dtype)


def _norm_of(x: torch.Tensor, g: torch.Generator) -> tuple[gemv_ops.Norm, torch.Tensor]:
    """A Norm of x with a random weight (sums from torch) and rms_norm's normed x."""
    weight = (1 + 0.3 * _rand(g, x.shape[1])).to(x.dtype)
    sums = _sums_reference(x).float()
    return gemv_ops.Norm(sums, weight, EPS), fused_ops.rms_norm(x, weight, EPS)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rows", [1, 2])
@pytest.mark.parametrize("n,k", [(17920, 1536), (2048, 1024), (32, 72)])
def test_norm_prologue_is_rms_norm_then_the_gemv(rows, n, k, dtype):
    """Where the sum of squares is exact, a normed GEMV is bitwise rms_norm then the GEMV:
    plain, SiLU-and-mul and rotary + KV store epilogues (17920 wide: 4 columns a warp)."""
    g = torch.Generator(device="cuda").manual_seed(rows * 17 + n + k)
    x = _exact_rows(g, rows, k, dtype)
    norm, normed = _norm_of(x, g)
    w = _rand(g, n, k, scale=k**-0.5).to(dtype)
    b = _rand(g, n).to(dtype) if rows == 2 else None
    assert torch.equal(gemv_ops.linear_normed(x, w, b, norm), gemv_ops.gemv(normed, w, b))
    assert torch.equal(gemv_ops.linear_silu_and_mul(x, w, b, norm),
                       gemv_ops.linear_silu_and_mul(normed, w, b))
    heads, kv_heads, head_dim = 4, 2, 16
    wq = _rand(g, (heads + 2 * kv_heads) * head_dim, k, scale=k**-0.5).to(dtype)
    table = torch.rand(64, head_dim, device="cuda", generator=g)
    cos, sin = table.cos().contiguous(), table.sin().contiguous()
    positions = torch.tensor([5, 63][:rows], device="cuda")
    slots = torch.tensor([17, 40][:rows], device="cuda")
    outs = []
    for arg, extra in ((x, norm), (normed, None)):
        caches = [torch.zeros(4, 16, kv_heads, head_dim, dtype=dtype, device="cuda")
                  for _ in range(2)]
        qkv = gemv_ops.linear_rotary_store_kv(arg, wq, None, positions, cos, sin, heads,
                                              kv_heads, head_dim, *caches, slots, extra)
        outs.append((qkv, *caches))
    for ours, theirs in zip(*outs, strict=True):
        assert torch.equal(ours, theirs)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("hidden", [1536, 4096, 64])
@pytest.mark.parametrize("rows", [1, 2])
def test_add_then_norm_is_fused_add_rms_norm_up_to_the_sum_order(rows, hidden, dtype):
    """o_proj's add (gemv_add) then the next GEMV's norm on random rows, read back through an
    identity weight (the GEMV of a normed x by I is that x): within one ulp of
    fused_add_rms_norm's normed x everywhere and equal to it almost everywhere (only where the
    other order of the sum of squares moves the inverse RMS across a rounding)."""
    g = torch.Generator(device="cuda").manual_seed(rows * 19 + hidden)
    o = _rand(g, rows, 1024).to(dtype)
    w_o = _rand(g, hidden, 1024, scale=1024**-0.5).to(dtype)
    residual = _rand(g, rows, hidden).to(dtype)
    weight = (1 + 0.3 * _rand(g, hidden)).to(dtype)
    h = gemv_ops.gemv(o, w_o)
    expected, expected_residual = fused_ops.fused_add_rms_norm(h.clone(), residual.clone(),
                                                               weight, EPS)
    summed = gemv_ops.linear_add(o, w_o, None, residual)
    assert torch.equal(residual, expected_residual)
    eye = torch.eye(hidden, device="cuda", dtype=dtype)
    normed = gemv_ops.linear_normed(residual, eye, None,
                                    gemv_ops.Norm(summed.sums, weight, EPS))
    ulp = {torch.bfloat16: 2.0**-7, torch.float16: 2.0**-10}[dtype]
    diff = (normed.double() - expected.double()).abs()
    assert (diff <= expected.double().abs() * ulp + 1e-30).all()
    assert (normed == expected).float().mean() >= 0.99


NORM_BAD_CALLS = PRELUDE + """
x, w, out = torch.zeros(1, 64, **bf), torch.zeros(32, 64, **bf), torch.zeros(1, 32, **bf)
sums, nw = torch.zeros(1, 8, device="cuda"), torch.zeros(64, **bf)
big = torch.zeros(1, 4104, **bf)
errors = [
    ops.gemv_add(out, x, w, none, torch.zeros(1, 5, device="cuda")),        # sums [1, 4]
    ops.gemv_add(out, x, w, none, torch.zeros(1, 4, device="cuda").half()),  # sums dtype
    ops.gemv_normed(out, x, w, none, torch.zeros(1, 7, device="cuda"), nw, 1e-6),
    ops.gemv_normed(out, x, w, none, sums, nw[:32], 1e-6),                    # weight [64]
    ops.gemv_normed(out, big, torch.zeros(32, 4104, **bf), none,
                    torch.zeros(1, 513, device="cuda"), torch.zeros(4104, **bf), 1e-6),
    ops.gemv_normed(out, x, w, none, sums, nw, -1.0),                         # eps
    ops.gemv_normed(out, x, w, none, none, none, 0.0),                        # no sums
    ops.gemv_silu_and_mul(torch.zeros(1, 16, **bf), x, w, none, sums.cpu(), nw, 1e-6),
]
assert all(errors), errors
print("|".join(errors))
"""


def test_norm_bindings_return_errors_instead_of_crashing():
    errors = errors_of(NORM_BAD_CALLS)
    assert "sums must be contiguous float32 [1, 4]" in errors[0]
    assert "sums must be contiguous float32 [1, 4]" in errors[1]
    assert "norm_sums must be contiguous float32 [1, 8]" in errors[2]
    assert "norm_weight must be contiguous [64]" in errors[3]
    assert "k up to 4096" in errors[4]
    assert "eps must be >= 0" in errors[5]
    assert "needs norm_sums" in errors[6]
    assert "norm_sums must be a CUDA tensor" in errors[7]


@pytest.mark.parametrize("shape", ["small-qwen3", "small-llama"])
def test_decode_layers_with_the_norms_in_the_gemvs(tmp_path, monkeypatch, shape):
    """A bf16 decode step of one sequence splits every layer's add + norms around its GEMVs
    (inside the captured CUDA graph too, whose tokens equal the eager run's); its logits agree
    with NANOPD_GEMV_NORM=0's within bf16 rounding (the sums of squares are made in another
    order) and mostly have the same argmax. Two sequences do not take it."""
    import random

    from services.worker.engine import LLM, SamplingParams
    from services.worker.models.random_model import tiny_test_model

    path = tiny_test_model(shape, tmp_path, None)
    calls: list[int] = []
    real = gemv_ops.linear_add
    monkeypatch.setattr(gemv_ops, "linear_add",
                        lambda *a, **kw: calls.append(1) or real(*a, **kw))
    llm = LLM(str(path), device="cuda:0", dtype="bfloat16", num_kv_blocks=256)
    runner = llm.engine.runner
    layers = len(runner.model.model.layers)
    assert runner.graphs is not None and calls  # captured with the split norms
    params = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)
    graphed = llm.generate([[1, 2, 3]], params)[0].token_ids
    runner.graphs = None  # eager from here
    assert llm.generate([[1, 2, 3]], params)[0].token_ids == graphed
    runner.kv_pool.normal_()
    rng = random.Random(7)
    for n in (1, 2):
        batch = random_decode_batch(rng, n, 256, 200)
        calls.clear()
        fused = runner.run(batch, list(range(n))).float().clone()
        assert len(calls) == (2 * layers if n <= gemv_ops.FUSE_MAX_ROWS else 0)
        monkeypatch.setenv("NANOPD_GEMV_NORM", "0")
        plain = runner.run(batch, list(range(n))).float()
        monkeypatch.delenv("NANOPD_GEMV_NORM")
        assert (fused - plain).abs().max() <= 0.02 * plain.abs().max()
        assert (fused.argmax(-1) == plain.argmax(-1)).float().mean() >= 0.6
