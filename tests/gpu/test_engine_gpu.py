"""The engine on a GPU: token-exact with HF transformers (fp32), sane in bf16."""

from __future__ import annotations

import random
from pathlib import Path

import pytest
import torch

from services.worker.engine import LLM, SamplingParams
from tests.gpu.batches import random_decode_batch
from tests.hf_reference import hf_greedy

SHAPES = ["tiny-llama", "tiny-llama-linear", "tiny-qwen2", "tiny-qwen3"]
NUM_NEW = 32


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("gpu-models")


def _prompts(lengths: list[int], seed: int, vocab: int) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(vocab) for _ in range(n)] for n in lengths]


@pytest.mark.parametrize("shape", SHAPES)
def test_greedy_matches_hf_fp32_on_gpu(root, shape):
    from services.worker.models.random_model import tiny_test_model

    torch.backends.cuda.matmul.allow_tf32 = False
    path = tiny_test_model(shape, root, None)
    ps = _prompts([5, 23, 40, 71, 130], seed=0, vocab=500)
    llm = LLM(str(path), device="cuda:0", dtype="float32", num_kv_blocks=256,
              max_num_batched_tokens=64)  # chunked prefill too
    outs = llm.generate(ps, SamplingParams(temperature=0, max_tokens=NUM_NEW, ignore_eos=True))
    want = [hf_greedy(path, p, NUM_NEW, torch.float32, "cuda") for p in ps]
    assert [o.token_ids for o in outs] == want
    assert llm.engine.blocks.num_free_blocks == 256


def test_bf16_mostly_agrees_with_hf(root):
    """bf16 rounding differs between implementations; most first tokens still agree."""
    from services.worker.models.random_model import tiny_test_model

    path = tiny_test_model("tiny-qwen3", root, None)
    ps = _prompts([17, 33, 64, 90] * 4, seed=1, vocab=500)
    llm = LLM(str(path), device="cuda:0", dtype="bfloat16", num_kv_blocks=256)
    outs = llm.generate(ps, SamplingParams(temperature=0, max_tokens=4, ignore_eos=True))
    agree = sum(o.token_ids[0] == hf_greedy(path, p, 1, torch.bfloat16, "cuda")[0]
                for o, p in zip(outs, ps, strict=True))
    assert agree >= 0.75 * len(ps)


def _kernels_built() -> bool:
    from services.worker.ops import cuda_ops

    return cuda_ops.load() is not None


needs_kernels = pytest.mark.skipif(not _kernels_built(), reason="make kernels first")


@needs_kernels
@pytest.mark.parametrize("shape", ["small-qwen3", "small-llama"])
def test_cuda_graphs_give_the_eager_tokens(root, shape):
    """A constant batch of 8 (a captured size, so no padding rows and the same GEMM shapes):
    replayed graphs must give exactly the eager steps' tokens."""
    from services.worker.models.random_model import tiny_test_model

    path = tiny_test_model(shape, root, None)
    ps = _prompts([5, 23, 40, 71, 130, 9, 64, 200], seed=2, vocab=500)
    params = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True)
    kw = {"device": "cuda:0", "dtype": "bfloat16", "num_kv_blocks": 512, "max_num_seqs": 16}
    graphed = LLM(str(path), **kw)
    assert graphed.engine.runner.graphs is not None
    assert graphed.engine.runner.graphs.sizes == [1, 2, 4, 8, 16]
    eager = LLM(str(path), enforce_eager=True, **kw)
    assert eager.engine.runner.graphs is None
    want = [o.token_ids for o in eager.generate(ps, params)]
    assert [o.token_ids for o in graphed.generate(ps, params)] == want
    assert graphed.engine.blocks.num_free_blocks == 512


@needs_kernels
def test_cuda_graphs_pad_ragged_batches(root):
    """Sequences finish at different steps: batches of 7, 5, 3 ... run padded in the graphs of
    8 and 4; their logits agree with eager steps' (GEMMs of another row count may round
    differently, so logits, not bits)."""
    from services.worker.models.random_model import tiny_test_model

    path = tiny_test_model("small-qwen3", root, None)
    llm = LLM(str(path), device="cuda:0", dtype="bfloat16", num_kv_blocks=512)
    runner = llm.engine.runner
    rng = random.Random(4)
    for n in (1, 3, 5, 7, 13):
        batch = random_decode_batch(rng, n, 512, 300)  # disjoint tables, scattered blocks
        graphed = runner.run(batch, list(range(n))).float().clone()
        graphs, runner.graphs = runner.graphs, None
        eager = runner.run(batch, list(range(n))).float()
        runner.graphs = graphs
        torch.testing.assert_close(graphed, eager, atol=5e-2, rtol=5e-2)
        assert (graphed.argmax(-1) == eager.argmax(-1)).float().mean() >= 0.8


@needs_kernels
@pytest.mark.parametrize("shape", ["small-qwen3", "small-llama"])
def test_kernels_give_the_torch_path_tokens(root, shape, monkeypatch):
    """fp16, kernels + CUDA graphs against the torch reference attention, eager."""
    from services.worker.models.random_model import tiny_test_model
    from services.worker.ops import flash

    path = tiny_test_model(shape, root, None)
    ps = _prompts([7, 30, 64, 100, 150, 3, 90, 45], seed=3, vocab=500)
    params = SamplingParams(temperature=0, max_tokens=16, ignore_eos=True)
    kw = {"device": "cuda:0", "dtype": "float16", "num_kv_blocks": 512, "max_num_seqs": 8}
    fast = [o.token_ids for o in LLM(str(path), **kw).generate(ps, params)]
    monkeypatch.setenv("NANOPD_ATTN", "torch")
    monkeypatch.setattr(flash, "_routes", None)
    reference = LLM(str(path), enforce_eager=True, **kw)
    assert reference.engine.runner.graphs is None
    assert [o.token_ids for o in reference.generate(ps, params)] == fast


@needs_kernels
def test_copy_on_write_uses_the_kernel_and_copies_exactly(root, monkeypatch):
    """ModelRunner.copy_blocks goes through csrc's copy_blocks on a GPU; the pool afterwards
    equals torch indexing's; and n=2 greedy samples (forked: the shared last block is copied
    on write) both give the n=1 tokens."""
    from services.worker.models.random_model import tiny_test_model
    from services.worker.ops import cuda_ops

    path = tiny_test_model("small-qwen3", root, None)
    llm = LLM(str(path), device="cuda:0", dtype="bfloat16", num_kv_blocks=256)
    runner = llm.engine.runner
    runner.kv_pool.normal_()
    expected = runner.kv_pool.clone()
    copies = [(3, 200), (9, 2), (10, 11), (255, 0)]
    cuda_ops.copy_blocks_reference(expected, expected, [s for s, _ in copies],
                                   [d for _, d in copies])
    calls = []
    real = cuda_ops.copy_blocks
    monkeypatch.setattr(cuda_ops, "copy_blocks", lambda *a: calls.append(a) or real(*a))
    runner.copy_blocks(copies)
    assert len(calls) == 1
    assert torch.equal(runner.kv_pool.view(torch.int16), expected.view(torch.int16))
    ps = _prompts([21, 40], seed=5, vocab=500)  # 21: the last block is shared, partly full
    one = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
    two = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True, n=2)
    want = [o.token_ids for o in llm.generate(ps, one)]
    calls.clear()
    outs = llm.generate(ps, two)
    assert calls, "forked sequences made no copy-on-write copy"
    for o, w in zip(outs, want, strict=True):
        assert [c.token_ids for c in o.outputs] == [w, w]


PDL_SCRIPT = """
import json, random, sys
from services.worker.engine import LLM, SamplingParams
from services.worker.models.random_model import tiny_test_model
path = tiny_test_model("small-qwen3", sys.argv[1], None)
rng = random.Random(7)
ps = [[rng.randrange(500) for _ in range(n)] for n in (5, 40, 130, 1, 77)]
llm = LLM(str(path), device="cuda:0", dtype="bfloat16", num_kv_blocks=512, max_num_seqs=8)
params = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True)
print(json.dumps([o.token_ids for o in llm.generate(ps, params)]))
"""


@needs_kernels
def test_dependent_launches_give_the_same_tokens(root):
    """The kernels launched with programmatic dependent launch (csrc/launch.h, the default on
    sm_90) and without (NANOPD_PDL=0): CUDA graphs and eager steps give identical tokens (a
    kernel that read its predecessor's output before its wait would not, now and then)."""
    import json
    import os
    import subprocess
    import sys

    out = {}
    for pdl in ("1", "0"):
        r = subprocess.run([sys.executable, "-c", PDL_SCRIPT, str(root)], capture_output=True,
                           text=True, timeout=300, cwd=Path(__file__).resolve().parents[2],
                           env={**os.environ, "NANOPD_PDL": pdl})
        assert r.returncode == 0, r.stderr[-2000:]
        out[pdl] = json.loads(r.stdout.strip().splitlines()[-1])
    assert out["1"] == out["0"]
