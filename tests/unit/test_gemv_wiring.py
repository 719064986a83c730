"""ops/gemv_ops without a GPU: the model's Linear is nn.Linear to loaders, and CPU (or fp32,
or prefill-sized) inputs take F.linear."""

from __future__ import annotations

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


def test_forward_fused_wiring_equals_the_layer_path(tiny_model, monkeypatch):
    """DecoderLayer.forward_fused (NANOPD_GEMV_FUSE=1 on a GPU), with the two fused GEMVs
    replaced by their torch references, gives exactly the ordinary path's logits on the CPU:
    the residual stream (the first layer's too), the norms and the projections are wired as
    in `forward`."""
    from services.worker.engine import LLM
    from services.worker.ops.fused_reference import (
        fused_add_rms_norm_reference,
        rms_norm_reference,
        silu_and_mul_reference,
    )

    def add_norm_linear(x, residual, norm_weight, eps, weight, bias=None):
        if residual is None:
            return F.linear(rms_norm_reference(x, norm_weight, eps), weight, bias), x
        normed, new_residual = fused_add_rms_norm_reference(x, residual, norm_weight, eps)
        return F.linear(normed, weight, bias), new_residual

    def swiglu_linear(gate_up, weight, bias=None):
        return F.linear(silu_and_mul_reference(gate_up), weight, bias)

    llm = LLM(str(tiny_model("tiny-qwen2")), num_kv_blocks=64)
    runner = llm.engine.runner
    batch = [([5], 3, 4, [0]), ([7], 9, 10, [1])]
    plain = runner.run(batch, [0, 1]).clone()
    calls = []
    monkeypatch.setattr(gemv_ops, "fuse_enabled", lambda *a: True)
    monkeypatch.setattr(gemv_ops, "add_norm_linear",
                        lambda *a: calls.append("norm") or add_norm_linear(*a))
    monkeypatch.setattr(gemv_ops, "swiglu_linear",
                        lambda *a: calls.append("swiglu") or swiglu_linear(*a))
    fused = runner.run(batch, [0, 1])
    num_layers = len(runner.model.model.layers)
    assert calls.count("norm") == 2 * num_layers and calls.count("swiglu") == num_layers
    assert torch.equal(fused, plain)
