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
                        lambda x, w, b=None: calls.append(1)
                        or silu_and_mul_reference(F.linear(x, w, b)))
    fused = runner.run(batch, [0, 1])
    assert len(calls) == len(runner.model.model.layers)
    assert torch.equal(fused, plain)
