"""The fused layer kernels inside the model and inside a CUDA graph. Skipped without CUDA or
without `make kernels`.

A tiny random-weight model in bf16 must give the same greedy tokens with NANOPD_FUSED=1 as
with 0. Everything on the fused path but the norms is bitwise torch's; a norm's output
differs from torch's in at most ~1e-4 of its elements, by 1 ulp (tests/gpu/test_fused.py).
That can only change a token where the two best logits are within such a perturbation (the
random models are built for wide greedy margins: services/worker/models/random_model.py),
so tokens are compared exactly, and the logits of each step, teacher-forced on the torch
path's tokens, within a tolerance that says how far apart the paths are when a token does
differ.
"""

from __future__ import annotations

import random
from pathlib import Path

import pytest
import torch

from services.worker.engine import LLM, SamplingParams
from services.worker.models.layers import RotaryEmbedding
from services.worker.ops import cuda_ops, fused_ops
from services.worker.ops.fused_reference import (
    fused_add_rms_norm_reference,
    rotary_qk_reference,
    silu_and_mul_reference,
)
from tests.gpu.test_fused import check_norm, norm_weight, same_bits

pytestmark = pytest.mark.skipif(cuda_ops.load() is None,
                                reason="kernels not built (make kernels) or no CUDA")

SHAPES = ["tiny-qwen3", "tiny-qwen2", "tiny-llama"]
NUM_NEW = 16
FUSED = ("rms_norm", "fused_add_rms_norm", "rotary_store_kv", "silu_and_mul")


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("fused-models")


def _prompts(lengths: list[int], seed: int, vocab: int) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(vocab) for _ in range(n)] for n in lengths]


def _count_calls(monkeypatch) -> dict[str, int]:
    calls = dict.fromkeys(FUSED, 0)
    for name in FUSED:
        real = getattr(fused_ops, name)

        def counted(*args, _real=real, _name=name, **kw):
            calls[_name] += 1
            return _real(*args, **kw)

        monkeypatch.setattr(fused_ops, name, counted)
    return calls


def _teacher_forced_logits(llm: LLM, prompts: list[list[int]],
                           continuations: list[list[int]]) -> torch.Tensor:
    """`[1 + steps, num_seqs, vocab]`: the prefill's logits, then one decode step per
    continuation token, straight through the runner (blocks 8i .. 8i + 7 for sequence i)."""
    runner = llm.engine.runner
    tables = [list(range(8 * i, 8 * i + 8)) for i in range(len(prompts))]
    rows = list(range(len(prompts)))
    out = [runner.run([(p, 0, len(p), t) for p, t in zip(prompts, tables, strict=True)], rows)]
    for step in range(len(continuations[0])):
        batch = [([c[step]], len(p) + step, len(p) + step + 1, t)
                 for p, c, t in zip(prompts, continuations, tables, strict=True)]
        out.append(runner.run(batch, rows))
    return torch.stack(out).float()


@pytest.mark.parametrize("shape", SHAPES)
def test_tiny_model_same_greedy_tokens_fused_or_not(root, shape, monkeypatch):
    from services.worker.models.random_model import tiny_test_model

    path = tiny_test_model(shape, root, None)
    prompts = _prompts([5, 23, 40, 71], seed=2, vocab=500)
    params = SamplingParams(temperature=0, max_tokens=NUM_NEW, ignore_eos=True)
    calls = _count_calls(monkeypatch)
    runs = {}
    for switch in ("0", "1"):  # a fresh engine each: no prefix cache shared across paths
        monkeypatch.setenv("NANOPD_FUSED", switch)
        llm = LLM(str(path), device="cuda:0", dtype="bfloat16", num_kv_blocks=64)
        tokens = [o.token_ids for o in llm.generate(prompts, params)]
        if switch == "0":
            assert sum(calls.values()) == 0, calls
            continuations = tokens
        logits = _teacher_forced_logits(llm, prompts, continuations)
        runs[switch] = (tokens, logits)
    assert all(calls[name] > 0 for name in FUSED), f"a fused kernel never ran: {calls}"
    (want, ref_logits), (got, fused_logits) = runs["0"], runs["1"]
    diff = (fused_logits - ref_logits).abs()
    # bf16 logits of std ~16 have an ulp of 0.125-0.25; a few ulps apart, rarely
    assert float(diff.max()) <= 1.0, f"logits differ by up to {float(diff.max()):.3f}"
    assert float((diff > 0).float().mean()) <= 0.1
    assert got == want


def test_fused_ops_in_a_cuda_graph():
    """One captured graph of the three kernels (a layer's shapes, Qwen3 q/k norm), replayed
    on new inputs, positions and slots written in place: each result equals its reference."""
    torch.manual_seed(0)
    t, h, kvh, d, hidden, inter, bs, max_pos = 5, 12, 2, 128, 1536, 8960, 16, 4096
    dt = torch.bfloat16
    width = (h + 2 * kvh) * d
    x = torch.empty(t, hidden, dtype=dt, device="cuda")
    residual = torch.empty_like(x)
    qkv = torch.empty(t, width, dtype=dt, device="cuda")
    gate_up = torch.empty(t, 2 * inter, dtype=dt, device="cuda")
    positions = torch.zeros(t, dtype=torch.int64, device="cuda")
    slots = torch.zeros(t, dtype=torch.int64, device="cuda")
    k_cache = torch.zeros(32, bs, kvh, d, dtype=dt, device="cuda")
    v_cache = torch.zeros_like(k_cache)
    act = torch.empty(t, inter, dtype=dt, device="cuda")
    weight = norm_weight(hidden, dt, seed=1)
    qw, kw = norm_weight(d, dt, seed=2), norm_weight(d, dt, seed=3)
    rotary = RotaryEmbedding(d, max_pos, 1e6, None).to("cuda")

    def layer_ops() -> None:
        fused_ops.fused_add_rms_norm(x, residual, weight, 1e-6)
        fused_ops.rotary_store_kv(qkv, positions, rotary.cos, rotary.sin, h, kvh, d, k_cache,
                                  v_cache, slots, qw, kw, 1e-6)
        fused_ops.silu_and_mul(gate_up, out=act)

    def load(seed: int) -> tuple[torch.Tensor, ...]:
        g = torch.Generator(device="cuda").manual_seed(seed)
        new = [torch.randn(a.shape, device="cuda", generator=g).to(dt)
               for a in (x, residual, qkv, gate_up)]
        for dst, src in zip((x, residual, qkv, gate_up), new, strict=True):
            dst.copy_(src)
        positions.copy_(torch.randint(0, max_pos, (t,), device="cuda", generator=g))
        slots.copy_(torch.randperm(32 * bs, device="cuda", generator=g)[:t])
        slots[1] = -1
        k_cache.zero_()
        v_cache.zero_()
        return tuple(new)

    load(0)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        layer_ops()  # warm-up outside the capture
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        layer_ops()
    for seed in (1, 2):
        x0, r0, qkv0, gu0 = load(seed)
        graph.replay()
        torch.cuda.synchronize()
        _, want_residual = fused_add_rms_norm_reference(x0, r0, weight, 1e-6)
        assert same_bits(residual, want_residual)
        check_norm(x, want_residual, weight, 1e-6)
        q, k, v = rotary_qk_reference(qkv0, positions, rotary.cos, rotary.sin, h, kvh, d,
                                      qw, kw, 1e-6)
        torch.testing.assert_close(qkv[:, : h * d].float(), q.flatten(1).float(), atol=0.1,
                                   rtol=8e-3)
        stored = k_cache.view(-1, kvh, d)[slots[[0, 2, 3, 4]]]
        torch.testing.assert_close(stored.float(), k[[0, 2, 3, 4]].float(), atol=0.1,
                                   rtol=8e-3)
        assert same_bits(v_cache.view(-1, kvh, d)[slots[[0, 2, 3, 4]]], v[[0, 2, 3, 4]])
        assert int((v_cache != 0).sum()) <= 4 * kvh * d  # the padding token stored nothing
        assert same_bits(act, silu_and_mul_reference(gu0))
