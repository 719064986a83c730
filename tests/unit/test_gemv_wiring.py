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
