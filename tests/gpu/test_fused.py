"""Fused decoder-layer kernels (csrc/fused.cu) against their torch references
(ops/fused_reference.py) on fresh random inputs. Skipped without CUDA or `make kernels`.

rotary_store_kv (without q/k norm) and silu_and_mul must be bitwise equal. The norms sum the
mean of squares in another order than torch, so the fp32 normalized value may round to the
neighbour of torch's in the dtype: each output must be `weight * n` for n torch's normalized
value or one of its two neighbours (1 ulp), and >= 99.9% of them bitwise torch's. Outputs
start NaN-poisoned; inputs sit inside NaN-filled wider buffers, so a read or write outside a
row shows.
"""

from __future__ import annotations

import pytest
import torch

from services.worker.models.layers import RotaryEmbedding
from services.worker.ops import cuda_ops, fused_ops
from services.worker.ops.attention import store_kv_reference
from services.worker.ops.fused_reference import (
    fused_add_rms_norm_reference,
    rotary_qk_reference,
    silu_and_mul_reference,
)

pytestmark = pytest.mark.skipif(cuda_ops.load() is None,
                                reason="kernels not built (make kernels) or no CUDA")

DTYPES = [torch.bfloat16, torch.float16]
DTYPE_IDS = ["bf16", "fp16"]
TOKENS = [1, 7, 300, 4096]
HIDDEN = [8, 64, 200, 1536, 3584, 8192]
PAD = 8  # elements of NaN on each side of a strided row (16 bytes)
MIN_BITWISE = 0.999
NAN = float("nan")


def bits(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().view(torch.int16)


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.shape == b.shape and torch.equal(bits(a), bits(b))


def assert_mostly_bitwise(got: torch.Tensor, want: torch.Tensor) -> None:
    """At most 0.1% of the elements differ in their bits, and at most 2 of a small tensor:
    a norm's flips are rare (fp32 sums ~1e-7 apart against a 16-bit ulp of 5e-4..4e-3), but
    one in a case of a few hundred elements is no failure."""
    differ = int((bits(got) != bits(want)).sum())
    allowed = max(2, int((1 - MIN_BITWISE) * got.numel()))
    assert differ <= allowed, f"{differ} of {got.numel()} elements differ from torch's bits"


def neighbours(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The next lower and next higher 16-bit float of each element (sign-magnitude bits)."""
    b = bits(x).int()
    key = torch.where(b < 0, -(b & 0x7FFF), b)  # monotonic in the value; -0 and +0 are 0

    def from_key(k: torch.Tensor) -> torch.Tensor:
        raw = torch.where(k < 0, (-k) | 0x8000, k)
        raw = torch.where(raw >= 0x8000, raw - 0x10000, raw)
        return raw.to(torch.int16).view(x.dtype).view(x.shape)

    return from_key(key - 1), from_key(key + 1)


def check_norm(got: torch.Tensor, rows: torch.Tensor, weight: torch.Tensor, eps: float):
    """got = RMSNorm(rows) up to 1 ulp of the normalized value, mostly bitwise."""
    xf = rows.float()
    n = (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)).to(rows.dtype)
    want = weight * n
    lo, hi = neighbours(n)
    ok = (bits(got) == bits(want)) | (bits(got) == bits(weight * lo)) | (
        bits(got) == bits(weight * hi))
    assert bool(ok.all()), f"{int((~ok).sum())} elements off by more than 1 ulp of the norm"
    assert_mostly_bitwise(got, want)


def padded(rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(buffer, view): rows copied into a NaN buffer with PAD columns on each side."""
    t, w = rows.shape
    buf = torch.full((t, w + 2 * PAD), NAN, dtype=rows.dtype, device=rows.device)
    view = buf[:, PAD:PAD + w]
    view.copy_(rows)
    return buf, view


def assert_pads_untouched(buf: torch.Tensor) -> None:
    assert bool(buf[:, :PAD].isnan().all()) and bool(buf[:, -PAD:].isnan().all())


def activations(num_tokens: int, width: int, dtype: torch.dtype, seed: int) -> torch.Tensor:
    """Normal rows scaled by e^U(-4, 4) per row (magnitudes over 3 decades), one zero row."""
    g = torch.Generator(device="cuda").manual_seed(seed)
    x = torch.randn(num_tokens, width, device="cuda", generator=g)
    x *= torch.empty(num_tokens, 1, device="cuda").uniform_(-4, 4, generator=g).exp()
    if num_tokens > 2:
        x[num_tokens // 2] = 0
    return x.to(dtype)


def norm_weight(size: int, dtype: torch.dtype, seed: int) -> torch.Tensor:
    g = torch.Generator(device="cuda").manual_seed(seed)
    return (1 + 0.1 * torch.randn(size, device="cuda", generator=g)).to(dtype)


@pytest.mark.parametrize("num_tokens", TOKENS)
@pytest.mark.parametrize("hidden", HIDDEN)
@pytest.mark.parametrize("strided", [False, True], ids=["contiguous", "strided"])
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_rms_norm(num_tokens, hidden, strided, dtype):
    eps = 1e-6
    x = activations(num_tokens, hidden, dtype, seed=hidden + num_tokens)
    weight = norm_weight(hidden, dtype, seed=hidden)
    buf, xs = padded(x) if strided else (None, x.clone())
    out = torch.full_like(x, NAN)
    assert fused_ops.rms_norm(xs, weight, eps, out=out) is out
    check_norm(out, x, weight, eps)
    assert same_bits(xs, x)  # the input is left alone
    if strided:
        assert_pads_untouched(buf)


@pytest.mark.parametrize("num_tokens", TOKENS)
@pytest.mark.parametrize("hidden", HIDDEN)
@pytest.mark.parametrize("strided", [False, True], ids=["contiguous", "strided"])
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_fused_add_rms_norm(num_tokens, hidden, strided, dtype):
    eps = 1e-5
    x = activations(num_tokens, hidden, dtype, seed=3 * hidden + num_tokens)
    residual = activations(num_tokens, hidden, dtype, seed=5 * hidden + num_tokens)
    weight = norm_weight(hidden, dtype, seed=hidden + 1)
    _, want_residual = fused_add_rms_norm_reference(x, residual, weight, eps)
    if strided:  # both in place, in wider NaN buffers
        xbuf, xs = padded(x)
        rbuf, rs = padded(residual)
    else:
        xs, rs = x.clone(), residual.clone()
    got_x, got_residual = fused_ops.fused_add_rms_norm(xs, rs, weight, eps)
    assert got_x is xs and got_residual is rs
    assert same_bits(rs, want_residual)  # round(x + residual): bitwise
    check_norm(xs, want_residual, weight, eps)
    if strided:
        assert_pads_untouched(xbuf)
        assert_pads_untouched(rbuf)


def test_rms_norm_widest_row_and_refusals():
    x = activations(3, fused_ops.MAX_NORM_HIDDEN, torch.bfloat16, seed=9)
    weight = norm_weight(x.shape[1], x.dtype, seed=9)
    check_norm(fused_ops.rms_norm(x, weight, 1e-6), x, weight, 1e-6)
    for bad in (torch.zeros(2, fused_ops.MAX_NORM_HIDDEN + 8, device="cuda").bfloat16(),
                torch.zeros(2, 12, device="cuda").bfloat16(),  # not a multiple of 8
                torch.zeros(2, 64, device="cuda")):            # float32: the torch path
        assert not (fused_ops.norm_supported(bad) and bad.dtype in fused_ops.DTYPES)
        with pytest.raises(ValueError, match="rms_norm"):
            fused_ops.rms_norm(bad, torch.ones(bad.shape[1], dtype=bad.dtype, device="cuda"),
                               1e-6)


SILU_WIDTHS = [8, 64, 1536, 8960, 18944]  # intermediate sizes


@pytest.mark.parametrize("num_tokens", TOKENS)
@pytest.mark.parametrize("intermediate", SILU_WIDTHS)
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_silu_and_mul_bitwise(num_tokens, intermediate, dtype):
    if num_tokens == 4096 and intermediate == 18944 and dtype == torch.float16:
        pytest.skip("the bf16 case covers the largest shape")
    x = activations(num_tokens, 2 * intermediate, dtype, seed=intermediate + num_tokens)
    x[0, :4] = torch.tensor([-100.0, 100.0, 0.0, -0.0])  # exp overflow, saturation, zeros
    buf, xs = padded(x)
    out = torch.full((num_tokens, intermediate), NAN, dtype=dtype, device="cuda")
    assert fused_ops.silu_and_mul(xs, out=out) is out
    assert same_bits(out, silu_and_mul_reference(x))
    assert_pads_untouched(buf)


ROTARY_MAX_POSITIONS = 8192


def rotary_case(num_tokens, num_heads, num_kv_heads, head_dim, dtype, qk_norm, seed,
                block_size=16):
    """Inputs and expected results of one rotary_store_kv call on layer 1 of a 2-layer pool."""
    g = torch.Generator(device="cuda").manual_seed(seed)
    width = (num_heads + 2 * num_kv_heads) * head_dim
    qkv = activations(num_tokens, width, dtype, seed)
    positions = torch.randint(0, ROTARY_MAX_POSITIONS, (num_tokens,), device="cuda",
                              generator=g)
    positions[0] = ROTARY_MAX_POSITIONS - 1
    num_blocks = -(-num_tokens // block_size) + 5
    slots = torch.randperm(num_blocks * block_size, device="cuda", generator=g)[:num_tokens]
    slots[::5] = -1  # padding tokens: nothing stored
    pool = torch.full((2, 2, num_blocks, block_size, num_kv_heads, head_dim), NAN,
                      dtype=dtype, device="cuda")
    rotary = RotaryEmbedding(head_dim, ROTARY_MAX_POSITIONS, 1e6, None).to("cuda")
    norms = ((norm_weight(head_dim, dtype, seed + 1), norm_weight(head_dim, dtype, seed + 2),
              1e-6) if qk_norm else (None, None, 0.0))
    q, k, v = rotary_qk_reference(qkv, positions, rotary.cos, rotary.sin, num_heads,
                                  num_kv_heads, head_dim, *norms)
    want_pool = pool.clone()
    keep = slots >= 0
    store_kv_reference(k[keep], v[keep], want_pool[1, 0], want_pool[1, 1], slots[keep])
    want_qkv = torch.cat([q.flatten(1), k.flatten(1), v.flatten(1)], dim=1)
    args = (positions, rotary.cos, rotary.sin, num_heads, num_kv_heads, head_dim,
            pool[1, 0], pool[1, 1], slots, *norms)
    return qkv, args, pool, want_qkv, want_pool


NORMED_TOLERANCE = {torch.bfloat16: (0.1, 8e-3), torch.float16: (0.012, 2e-3)}  # atol, rtol


def check_rotary(got_qkv, got_pool, want_qkv, want_pool, qk_norm, dtype):
    if not qk_norm:
        assert same_bits(got_qkv, want_qkv)
        assert same_bits(got_pool, want_pool)
        return
    # the normed q/k may sit 1 ulp off torch's (the norms' summation order), then rotate
    atol, rtol = NORMED_TOLERANCE[dtype]
    for got, want in ((got_qkv, want_qkv), (got_pool, want_pool)):
        torch.testing.assert_close(got.float(), want.float(), atol=atol, rtol=rtol,
                                   equal_nan=True)
        written = ~want.isnan()
        assert bool((got.isnan() == ~written).all())
        assert_mostly_bitwise(got[written], want[written])


@pytest.mark.parametrize("num_tokens", TOKENS)
@pytest.mark.parametrize("group", [1, 4, 6, 8])
@pytest.mark.parametrize("head_dim", [64, 128])
@pytest.mark.parametrize("qk_norm", [False, True], ids=["plain", "qk_norm"])
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_rotary_store_kv(num_tokens, group, head_dim, qk_norm, dtype):
    kvh = 2
    qkv, args, pool, want_qkv, want_pool = rotary_case(
        num_tokens, group * kvh, kvh, head_dim, dtype, qk_norm, seed=num_tokens + group)
    buf, qkv_s = padded(qkv)  # strided rows, as a slice of a wider buffer
    fused_ops.rotary_store_kv(qkv_s, *args)
    check_rotary(qkv_s, pool, want_qkv, want_pool, qk_norm, dtype)
    assert_pads_untouched(buf)
    assert bool(pool[0].isnan().all()), "layer 0 of the pool was written"


@pytest.mark.parametrize("head_dim", [16, 32, 256, 512])
@pytest.mark.parametrize("qk_norm", [False, True], ids=["plain", "qk_norm"])
def test_rotary_store_kv_other_head_dims(head_dim, qk_norm):  # 32: the tiny test models
    qkv, args, pool, want_qkv, want_pool = rotary_case(
        37, 8, 2, head_dim, torch.bfloat16, qk_norm, seed=head_dim, block_size=32)
    fused_ops.rotary_store_kv(qkv, *args)
    check_rotary(qkv, pool, want_qkv, want_pool, qk_norm, torch.bfloat16)


def test_rotary_position_outside_the_table_gives_nan():
    qkv, args, pool, _, _ = rotary_case(3, 4, 2, 64, torch.bfloat16, False, seed=1)
    positions = torch.tensor([-1, ROTARY_MAX_POSITIONS, 5], device="cuda")
    v_before = qkv[:, 6 * 64:].clone()
    fused_ops.rotary_store_kv(qkv, positions, *args[1:])
    assert bool(qkv[:2, : 6 * 64].isnan().all()) and not bool(qkv[2].isnan().any())
    assert same_bits(qkv[:, 6 * 64:], v_before)


def test_rotary_refuses_unbuilt_head_dims():
    qkv = torch.zeros(2, 8 * 80, dtype=torch.bfloat16, device="cuda")
    assert not fused_ops.rotary_supported(qkv, 80)
    cache = torch.zeros(4, 16, 2, 80, dtype=torch.bfloat16, device="cuda")
    pos = torch.zeros(2, dtype=torch.int64, device="cuda")
    table = torch.zeros(16, 80, device="cuda")
    with pytest.raises(ValueError, match="head_dim"):
        fused_ops.rotary_store_kv(qkv, pos, table, table, 4, 2, 80, cache, cache, pos)


BAD_CALLS = """
import torch
from services.worker.ops import cuda_ops
ops = cuda_ops._ops()
bf = {"dtype": torch.bfloat16, "device": "cuda"}
x, w = torch.zeros(2, 64, **bf), torch.ones(64, **bf)
cache = torch.zeros(4, 16, 2, 64, **bf)
pos = torch.zeros(2, dtype=torch.int64, device="cuda")
table = torch.zeros(16, 64, device="cuda")
none = torch.empty(0)
qkv = torch.zeros(2, 8 * 64, **bf)
errors = [
    ops.rms_norm(x.float(), x.float(), w.float(), 1e-6),
    ops.rms_norm(x[:, :60], x[:, :60], w[:60], 1e-6),
    ops.fused_add_rms_norm(x, x, w, 1e-6),
    ops.rotary_store_kv(qkv, pos, table, table, none, none, 0.0, cache, cache, pos, 4, 2, 80),
    ops.rotary_store_kv(qkv, pos.int(), table, table, none, none, 0.0, cache, cache, pos, 4, 2,
                        64),
    ops.rotary_store_kv(qkv, pos, table, table, w, none, 1e-6, cache, cache, pos, 4, 2, 64),
    ops.silu_and_mul(x, x),
    ops.silu_and_mul(x[:, :32].cpu(), x),
]
assert all(errors), errors
print("|".join(errors))
"""


def test_fused_bindings_return_errors_instead_of_crashing():
    """Straight to the extension, past the Python checks: every bad call returns its error;
    in a child process, so that a crash fails this test instead of the session."""
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[2]
    r = subprocess.run([sys.executable, "-c", BAD_CALLS], capture_output=True, text=True,
                       cwd=root, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    e = r.stdout.strip().split("|")
    assert "float16 or bfloat16" in e[0] and "multiple of 8" in e[1]
    assert "two tensors" in e[2] and "head_dim 80" in e[3] and "positions" in e[4]
    assert "both" in e[5] and "intermediate" in e[6] and "CUDA tensor" in e[7]
