"""The streaming one-row GEMV (csrc/gemv_stream.cuh: a wave of resident blocks whose warps
take column group after column group) against the one-group kernel it replaces and the
kernels before both, bitwise, on fresh random inputs; and that the launcher takes it exactly
where it should. Skipped without CUDA or `make kernels`."""

from __future__ import annotations

import pytest
import torch
from torch.profiler import ProfilerActivity, profile

from services.worker.ops import cuda_ops, fused_ops, gemv_ops

pytestmark = pytest.mark.skipif(
    not torch.cuda.is_available() or cuda_ops.load() is None
    or not hasattr(cuda_ops.load(), "gemv_add"), reason="needs CUDA and `make kernels`")

DTYPES = [torch.bfloat16, torch.float16]
EPS = 1e-6
# (n, k): the 1.5B and 0.6B gate_up; k of 8 pieces a lane; k not a multiple of 256; n / 2 odd
WIDE = [(17920, 1536), (6144, 1024), (8194, 2048), (20002, 1032)]


def _rand(g: torch.Generator, *shape: int, scale: float = 1.0) -> torch.Tensor:
    return torch.randn(*shape, device="cuda", generator=g) * scale


def _both(monkeypatch: pytest.MonkeyPatch, fn):
    """fn() with the streaming kernel allowed, then with NANOPD_GEMV_STREAM=0."""
    outs = []
    for value in ("1", "0"):
        monkeypatch.setenv("NANOPD_GEMV_STREAM", value)
        outs.append(fn())
    return outs


def _kernels_run(fn) -> set[str]:
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    return {e.name for e in prof.events() if e.device_type.name == "CUDA"}


def _norm(g: torch.Generator, x: torch.Tensor) -> gemv_ops.Norm:
    weight = (1 + 0.3 * _rand(g, x.shape[1])).to(x.dtype)
    sums = x.double().pow(2).view(x.shape[0], -1, gemv_ops.SUM_COLUMNS).sum(-1).float()
    return gemv_ops.Norm(sums, weight, EPS)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n,k", WIDE)
@pytest.mark.parametrize("normed", [False, True])
def test_streamed_silu_and_mul_is_bitwise_the_one_group_kernel(monkeypatch, n, k, normed,
                                                               dtype):
    g = torch.Generator(device="cuda").manual_seed(n + k + normed)
    x = _rand(g, 1, k).to(dtype)
    w = _rand(g, n, k, scale=k**-0.5).to(dtype)
    norm = _norm(g, x) if normed else None
    streamed, grouped = _both(monkeypatch, lambda: gemv_ops.linear_silu_and_mul(x, w, None, norm))
    assert torch.isfinite(streamed).all()
    assert torch.equal(streamed, grouped)
    if not normed and n // 2 % 8 == 0:  # silu_and_mul takes multiples of 8
        assert torch.equal(streamed, fused_ops.silu_and_mul(gemv_ops.gemv(x, w)))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n,k", [(17920, 1536), (16001, 1024), (9000, 2048)])
def test_streamed_normed_gemv_is_bitwise_the_one_group_kernel(monkeypatch, n, k, dtype):
    """The plain epilogue behind a NORM prologue (Qwen3's qkv_proj path), bias and odd n."""
    g = torch.Generator(device="cuda").manual_seed(n * 7 + k)
    x = _rand(g, 1, k).to(dtype)
    w = _rand(g, n, k, scale=k**-0.5).to(dtype)
    b = _rand(g, n).to(dtype)
    norm = _norm(g, x)
    streamed, grouped = _both(monkeypatch, lambda: gemv_ops.linear_normed(x, w, b, norm))
    assert streamed.shape == (1, n) and torch.isfinite(streamed).all()
    assert torch.equal(streamed, grouped)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("normed", [False, True])
@pytest.mark.parametrize("heads", [(56, 8, 128), (64, 32, 64)])
def test_streamed_rotary_is_bitwise_the_one_group_kernel(monkeypatch, heads, normed, dtype):
    """qkv rotated and both caches written, as the one-group kernel does: one slot, so only
    its rows of the caches may change."""
    num_heads, num_kv_heads, head_dim = heads
    hidden, n = 1536, (num_heads + 2 * num_kv_heads) * head_dim
    g = torch.Generator(device="cuda").manual_seed(n + head_dim + normed)
    x = _rand(g, 1, hidden).to(dtype)
    w = _rand(g, n, hidden, scale=hidden**-0.5).to(dtype)
    b = _rand(g, n).to(dtype)
    norm = _norm(g, x) if normed else None
    table = torch.rand(64, head_dim, device="cuda", generator=g)
    cos, sin = table.cos().contiguous(), table.sin().contiguous()
    positions, slots = torch.tensor([37], device="cuda"), torch.tensor([21], device="cuda")
    caches = [_rand(g, 4, 16, num_kv_heads, head_dim).to(dtype) for _ in range(2)]

    def run():
        mine = [c.clone() for c in caches]
        qkv = gemv_ops.linear_rotary_store_kv(x, w, b, positions, cos, sin, num_heads,
                                              num_kv_heads, head_dim, *mine, slots, norm)
        return qkv, *mine

    streamed, grouped = _both(monkeypatch, run)
    for ours, theirs in zip(streamed, grouped, strict=True):
        assert torch.equal(ours, theirs)
    for before, after in zip(caches, streamed[1:], strict=True):
        changed = (before != after).flatten(2).any(-1)
        assert changed.nonzero().tolist() == [[1, 5]]  # slot 21: block 1, offset 5


def test_the_launcher_streams_wide_one_row_layers_only(monkeypatch):
    """gemv_stream_kernel runs for one row of a layer wider than a wave, k <= 2048; never at
    two rows, past k 2048, for a narrow layer, or with NANOPD_GEMV_STREAM=0."""
    g = torch.Generator(device="cuda").manual_seed(5)
    dtype = torch.bfloat16

    def kernels(rows: int, n: int, k: int) -> set[str]:
        x, w = _rand(g, rows, k).to(dtype), _rand(g, n, k, scale=k**-0.5).to(dtype)
        return {name for name in _kernels_run(lambda: gemv_ops.linear_silu_and_mul(x, w))
                if "gemv" in name}

    def streamed(names: set[str]) -> bool:
        assert names, "no GEMV kernel ran"
        return any("gemv_stream_kernel" in name for name in names)

    monkeypatch.delenv("NANOPD_GEMV_STREAM", raising=False)
    assert streamed(kernels(1, 17920, 1536))
    assert not streamed(kernels(2, 17920, 1536))
    assert not streamed(kernels(1, 24576, 4096))
    assert not streamed(kernels(1, 2048, 1536))
    monkeypatch.setenv("NANOPD_GEMV_STREAM", "0")
    assert not streamed(kernels(1, 17920, 1536))
