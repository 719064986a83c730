"""The model's fused path (ops/fused_ops.py calls, in-place residual stream, q as a view of
qkv) on CPU: an extension stand-in implements each binding's contract with the torch
references, so any difference from the torch path is the wiring's, and the two must agree
bit for bit. The kernels themselves are tested on the GPU (tests/gpu/test_fused.py). Also
the refusal of a bad NANOPD_DECODE_MIN_CHUNK.
"""

from __future__ import annotations

import os
import random
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from services.worker.engine import LLM, SamplingParams
from services.worker.models.random_model import tiny_test_model
from services.worker.ops import cuda_ops, fused_ops
from services.worker.ops.attention import store_kv_reference
from services.worker.ops.fused_reference import (
    fused_add_rms_norm_reference,
    rms_norm_reference,
    rotary_qk_reference,
    silu_and_mul_reference,
)


def _rms_norm(out, x, weight, eps):
    out.copy_(rms_norm_reference(x, weight, eps))
    return ""


def _fused_add_rms_norm(x, residual, weight, eps):
    normed, new_residual = fused_add_rms_norm_reference(x, residual, weight, eps)
    x.copy_(normed)
    residual.copy_(new_residual)
    return ""


def _rotary_store_kv(qkv, positions, cos, sin, q_norm_weight, k_norm_weight, eps, k_cache,
                     v_cache, slot_mapping, num_heads, num_kv_heads, head_dim):
    norms = ((q_norm_weight, k_norm_weight, eps) if q_norm_weight.numel()
             else (None, None, 0.0))
    q, k, v = rotary_qk_reference(qkv, positions, cos, sin, num_heads, num_kv_heads,
                                  head_dim, *norms)
    keep = slot_mapping >= 0
    store_kv_reference(k[keep], v[keep], k_cache, v_cache, slot_mapping[keep])
    qkv[:, : num_heads * head_dim] = q.flatten(1)
    qkv[:, num_heads * head_dim : (num_heads + num_kv_heads) * head_dim] = k.flatten(1)
    return ""


def _silu_and_mul(out, x):
    out.copy_(silu_and_mul_reference(x))
    return ""


STAND_IN = SimpleNamespace(rms_norm=_rms_norm, fused_add_rms_norm=_fused_add_rms_norm,
                           rotary_store_kv=_rotary_store_kv, silu_and_mul=_silu_and_mul)


def _logits(llm: LLM, prompts: list[list[int]], steps: int) -> torch.Tensor:
    """Prefill, then `steps` greedy decode steps through the runner; all logits stacked."""
    runner = llm.engine.runner
    tables = [list(range(8 * i, 8 * i + 8)) for i in range(len(prompts))]
    rows = list(range(len(prompts)))
    out = [runner.run([(p, 0, len(p), t) for p, t in zip(prompts, tables, strict=True)], rows)]
    for step in range(steps):
        nxt = out[-1].argmax(-1).tolist()
        out.append(runner.run([([n], len(p) + step, len(p) + step + 1, t)
                               for n, p, t in zip(nxt, prompts, tables, strict=True)], rows))
    return torch.stack(out)


@pytest.mark.parametrize("shape", ["tiny-qwen3", "tiny-qwen2"])
def test_fused_wiring_matches_the_torch_path(tmp_path, shape, monkeypatch):
    path = tiny_test_model(shape, tmp_path, None)
    rng = random.Random(0)
    prompts = [[rng.randrange(500) for _ in range(n)] for n in (5, 30, 47)]
    llm = LLM(str(path), device="cpu", dtype="bfloat16", num_kv_blocks=32)
    params = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)
    want_tokens = [o.token_ids for o in llm.generate(prompts, params)]
    want = _logits(llm, prompts, 4)

    calls = dict.fromkeys(vars(STAND_IN), 0)

    def counted(name):
        def call(*args):
            calls[name] += 1
            return getattr(STAND_IN, name)(*args)
        return call

    monkeypatch.setattr(cuda_ops, "_ops", lambda: SimpleNamespace(
        **{name: counted(name) for name in vars(STAND_IN)}))
    monkeypatch.setattr(fused_ops, "enabled", lambda x: x.dtype in fused_ops.DTYPES)
    got = _logits(llm, prompts, 4)
    llm_fused = LLM(str(path), device="cpu", dtype="bfloat16", num_kv_blocks=32)
    got_tokens = [o.token_ids for o in llm_fused.generate(prompts, params)]
    assert all(calls.values()), calls
    assert torch.equal(got, want)
    assert got_tokens == want_tokens


@pytest.mark.parametrize("value", ["100", "0", "-64", "abc"])
def test_a_bad_decode_min_chunk_is_refused_at_import(value):
    """NANOPD_DECODE_MIN_CHUNK (a tuning knob of paged_decode) must be a positive multiple of
    64: anything else stops the import with a message naming it."""
    env = {**os.environ, "NANOPD_DECODE_MIN_CHUNK": value}
    done = subprocess.run([sys.executable, "-c", "import services.worker.ops.cuda_ops"],
                          env=env, capture_output=True, text=True, timeout=120,
                          cwd=Path(__file__).resolve().parents[2])
    assert done.returncode != 0
    assert f"NANOPD_DECODE_MIN_CHUNK={value!r}: must be a positive multiple of 64" in done.stderr
