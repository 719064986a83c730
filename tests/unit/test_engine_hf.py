"""Greedy decoding token-exact with HF transformers (fp32), per family and engine feature."""

from __future__ import annotations

import random

import pytest

from services.worker.engine import LLM, SamplingParams
from tests.conftest import TINY_SHAPES
from tests.hf_reference import hf_greedy

NUM_NEW = 32
GREEDY = SamplingParams(temperature=0, max_tokens=NUM_NEW, ignore_eos=True)


def prompts(lengths: list[int], seed: int = 0, vocab: int = 49000) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(vocab) for _ in range(n)] for n in lengths]


@pytest.fixture(scope="module", params=TINY_SHAPES)
def shape_model(request, tiny_model):
    return tiny_model(request.param)


def expected(path, ps):
    return [hf_greedy(path, p, NUM_NEW) for p in ps]


def test_mixed_length_batch(shape_model):
    ps = prompts([5, 23, 40, 71])
    llm = LLM(str(shape_model), num_kv_blocks=128)
    outs = llm.generate(ps, GREEDY)
    assert [o.token_ids for o in outs] == expected(shape_model, ps)
    assert llm.engine.blocks.num_free_blocks == 128


def test_chunked_prefill_smaller_than_prompt(shape_model):
    ps = prompts([71, 40], seed=1)
    llm = LLM(str(shape_model), num_kv_blocks=128, max_num_batched_tokens=16)
    outs = llm.generate(ps, GREEDY)
    assert [o.token_ids for o in outs] == expected(shape_model, ps)


def test_prefix_cache_hit(shape_model):
    shared = prompts([40], seed=2)[0]  # 2 full blocks of 16, plus a partial one
    a, b = shared + [11, 12, 13], shared + [21, 22]
    llm = LLM(str(shape_model), num_kv_blocks=128, block_size=16)
    out_a = llm.generate([a], GREEDY)[0]
    out_b = llm.generate([b], GREEDY)[0]
    assert out_a.num_cached_tokens == 0
    assert out_b.num_cached_tokens >= 32
    assert [out_a.token_ids, out_b.token_ids] == expected(shape_model, [a, b])
    assert llm.engine.blocks.prefix_hit_rate > 0


def test_n2_fork_shares_prompt_blocks(shape_model):
    p = prompts([37], seed=3)[0]  # partial last block: the fork copies it on write
    llm = LLM(str(shape_model), num_kv_blocks=128)
    out = llm.generate([p], SamplingParams(temperature=0, max_tokens=NUM_NEW, ignore_eos=True, n=2))
    want = expected(shape_model, [p])[0]
    assert [c.token_ids for c in out[0].outputs] == [want, want]
    assert llm.engine.blocks.num_free_blocks == 128


def test_forced_preemption_resumes_with_same_tokens(shape_model):
    ps = prompts([30, 25, 34], seed=4)
    # 12 blocks of 8 = 96 slots for three sequences that grow to ~60-66 tokens each
    llm = LLM(str(shape_model), num_kv_blocks=12, block_size=8, max_model_len=96)
    outs = llm.generate(ps, GREEDY)
    assert llm.engine.scheduler.num_preemptions > 0
    assert [o.token_ids for o in outs] == expected(shape_model, ps)
    assert llm.engine.blocks.num_free_blocks == 12
