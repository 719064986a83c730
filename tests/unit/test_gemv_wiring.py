"""ops/gemv_ops without a GPU: the model's Linear is nn.Linear to loaders, and CPU (or fp32,
or prefill-sized) inputs take F.linear."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from services.worker.models import llama
from services.worker.ops import gemv_ops


def test_linear_is_an_nn_linear_with_the_same_parameters():
    torch.manual_seed(0)
    ours, plain = gemv_ops.Linear(16, 24, bias=True), torch.nn.Linear(16, 24, bias=True)
    assert isinstance(ours, torch.nn.Linear)
    assert list(ours.state_dict()) == list(plain.state_dict())
    ours.load_state_dict(plain.state_dict())
    x = torch.randn(3, 16)
    assert torch.equal(ours(x), plain(x))


def test_cpu_and_large_batches_take_f_linear():
    x, w, b = torch.randn(1, 64).bfloat16(), torch.randn(32, 64).bfloat16(), None
    assert not gemv_ops.supported(x, w, b)
    assert torch.equal(gemv_ops.linear(x, w, b), F.linear(x, w, b))
    assert not gemv_ops.supported(torch.randn(9, 64), torch.randn(32, 64), None)


def test_the_model_projections_are_gemv_linears():
    src = llama.Attention.__init__.__code__.co_names + llama.MLP.__init__.__code__.co_names
    assert "Linear" in src  # qkv/o and gate_up/down are built from gemv_ops.Linear
    assert llama.Linear is gemv_ops.Linear


def test_mlp_silu_and_mul_epilogue_wiring_equals_the_layer_path(tiny_model, monkeypatch):
    """MLP.forward with SiLU-and-mul inside gate_up's GEMV (decode steps of one sequence on a
    GPU), the fused GEMV replaced by its torch reference, gives exactly the ordinary path's
    logits on the CPU. (The rotary epilogue needs the fused kernels, so CUDA: tests/gpu.)"""
    from services.worker.engine import LLM
    from services.worker.ops.fused_reference import silu_and_mul_reference

    llm = LLM(str(tiny_model("tiny-qwen2")), num_kv_blocks=64)
    runner = llm.engine.runner
    batch = [([5], 3, 4, [0]), ([7], 9, 10, [1])]
    plain = runner.run(batch, [0, 1]).clone()
    calls = []
    monkeypatch.setattr(gemv_ops, "fuse_enabled", lambda *a: True)
    monkeypatch.setattr(gemv_ops, "linear_silu_and_mul",
                        lambda x, w, b=None, norm=None: calls.append(1)
                        or silu_and_mul_reference(F.linear(x, w, b)))
    fused = runner.run(batch, [0, 1])
    assert len(calls) == len(runner.model.model.layers)
    assert torch.equal(fused, plain)


def _normed(x: torch.Tensor, norm: gemv_ops.Norm | None) -> torch.Tensor:
    from services.worker.ops.fused_reference import rms_norm_reference

    return x if norm is None else rms_norm_reference(x, norm.weight, norm.eps)


def _add_reference(x, w, b, residual):
    residual.copy_(F.linear(x, w, b) + residual)  # the plain path's linear, then its add
    rows, n = residual.shape
    pad = -n % gemv_ops.SUM_COLUMNS
    sq = F.pad(residual.float().pow(2), (0, pad)).view(rows, -1, gemv_ops.SUM_COLUMNS)
    return gemv_ops.Summed(sq.sum(-1))


def _rotary_reference(x, w, b, positions, cos, sin, heads, kv_heads, head_dim, k_cache,
                      v_cache, slots, norm=None):
    from services.worker.ops.attention import store_kv_reference
    from services.worker.ops.fused_reference import rotary_qk_reference

    q, k, v = rotary_qk_reference(F.linear(_normed(x, norm), w, b), positions, cos, sin,
                                  heads, kv_heads, head_dim)
    store_kv_reference(k, v, k_cache, v_cache, slots)
    return torch.cat([q.flatten(1), k.flatten(1), v.flatten(1)], dim=-1)


@pytest.mark.parametrize("shape", ["tiny-qwen2", "tiny-qwen3"])
def test_norms_split_around_the_gemvs_equal_the_layer_path(tiny_model, monkeypatch, shape):
    """The fused form of DecoderLayer (decode steps of one sequence on a GPU): o_proj and
    down_proj add into the residual in their GEMVs (`linear_add`), qkv and gate_up norm the
    residual stream as they read it (a `Norm`). With each fused GEMV replaced by its torch
    reference, a one-sequence step gives exactly the ordinary path's logits on the CPU, and
    every layer took the fused form (qwen2: rotary in the qkv GEMV; qwen3, with q/k norm:
    `linear_normed`, then the rotary kernel's path; the first layer's qkv reads the
    embedding's norm)."""
    from services.worker.engine import LLM
    from services.worker.ops.fused_reference import silu_and_mul_reference

    llm = LLM(str(tiny_model(shape)), num_kv_blocks=64)
    runner = llm.engine.runner
    layers = len(runner.model.model.layers)
    batch = [([5], 9, 10, [0])]
    plain = runner.run(batch, [0]).clone()
    calls: list[str] = []

    def counted(name, fn):
        return lambda *a, **kw: calls.append(name) or fn(*a, **kw)

    monkeypatch.setattr(gemv_ops, "norms_fusable", lambda x, ok: ok and x.shape[0] == 1)
    monkeypatch.setattr(gemv_ops, "fuse_enabled", lambda *a: True)
    monkeypatch.setattr(gemv_ops, "linear_add", counted("add", _add_reference))
    monkeypatch.setattr(gemv_ops, "linear_normed", counted(
        "normed", lambda x, w, b, norm: F.linear(_normed(x, norm), w, b)))
    monkeypatch.setattr(gemv_ops, "linear_silu_and_mul", counted(
        "silu", lambda x, w, b=None, norm=None:
        silu_and_mul_reference(F.linear(_normed(x, norm), w, b))))
    monkeypatch.setattr(gemv_ops, "linear_rotary_store_kv", counted("rotary", _rotary_reference))
    fused = runner.run(batch, [0])
    # the first layer's input is the embedding: its norm is rms_norm's, then the plain path
    qkv = ["normed" if shape == "tiny-qwen3" else "rotary"] * (layers - 1)
    assert sorted(calls) == sorted(["add"] * 2 * layers + ["silu"] * layers + qkv)
    assert torch.equal(fused, plain)
