"""Sampling parameters, seeds, top-k/top-p, stops, min_tokens, logprobs, request errors."""

from __future__ import annotations

import math

import pytest
import torch

from services.worker.engine import LLM, SamplingParams, SamplingParamsError
from services.worker.engine.engine import RequestError
from services.worker.engine.sampler import sample
from services.worker.engine.sequence import Sequence
from tests.unit.test_engine_hf import prompts


@pytest.mark.parametrize(
    "kwargs, name",
    [
        ({"temperature": -0.1}, "temperature"),
        ({"top_p": 0.0}, "top_p"),
        ({"top_p": 1.5}, "top_p"),
        ({"top_k": 0}, "top_k"),
        ({"max_tokens": 0}, "max_tokens"),
        ({"n": 0}, "n"),
        ({"min_tokens": 5, "max_tokens": 4}, "min_tokens"),
        ({"seed": 1.5}, "seed"),
        ({"stop": [""]}, "stop"),
    ],
)
def test_invalid_params_name_the_parameter_and_range(kwargs, name):
    with pytest.raises(SamplingParamsError) as err:
        SamplingParams(**kwargs)
    assert f"invalid {name}=" in str(err.value) and "must be" in str(err.value)


def test_from_dict_rejects_unknown_keys():
    with pytest.raises(SamplingParamsError, match="unknown sampling parameter"):
        SamplingParams.from_dict({"temprature": 1.0})


def _seq(params: SamplingParams, gen: torch.Generator | None = None) -> Sequence:
    s = Sequence("r", 0, [1, 2], 2, params, 0)
    s.generator = gen
    return s


def test_top_k_1_and_tiny_top_p_equal_greedy():
    logits = torch.randn(8, 1000, generator=torch.Generator().manual_seed(0))
    greedy = logits.argmax(-1).tolist()
    top_k_1 = SamplingParams(temperature=1.0, top_k=1)
    for p in (top_k_1, SamplingParams(temperature=1.0, top_p=1e-9)):
        tokens, _ = sample(logits.clone(), [_seq(p) for _ in range(8)], ())
        assert tokens == greedy


def test_top_k_samples_only_among_the_k_likeliest():
    logits = torch.randn(1, 100, generator=torch.Generator().manual_seed(1))
    top5 = set(logits[0].topk(5).indices.tolist())
    p = SamplingParams(temperature=2.0, top_k=5)
    g = torch.Generator().manual_seed(0)
    seen = {sample(logits.clone(), [_seq(p)], (), g)[0][0] for _ in range(200)}
    assert seen <= top5 and len(seen) > 1


def test_sampling_follows_the_distribution():
    logits = torch.tensor([[math.log(0.7), math.log(0.2), math.log(0.1)]])
    p = SamplingParams(temperature=1.0)
    g = torch.Generator().manual_seed(0)
    counts = [0, 0, 0]
    for _ in range(3000):
        counts[sample(logits.clone(), [_seq(p)], (), g)[0][0]] += 1
    assert abs(counts[0] / 3000 - 0.7) < 0.04 and abs(counts[2] / 3000 - 0.1) < 0.03


@pytest.fixture(scope="module")
def llm(tiny_model):
    return LLM(str(tiny_model("tiny-qwen3")), num_kv_blocks=256)


def test_same_seed_same_tokens_whatever_the_batch(llm):
    p = prompts([20], seed=5)[0]
    seeded = SamplingParams(temperature=1.0, max_tokens=16, seed=42, ignore_eos=True)
    alone = llm.generate([p], seeded)[0].token_ids
    others = prompts([7, 33, 12], seed=6)
    unseeded = SamplingParams(temperature=1.0, max_tokens=16, ignore_eos=True)
    batch = llm.generate([others[0], p, others[1], others[2]],
                         [unseeded, seeded, unseeded, unseeded])
    assert batch[1].token_ids == alone
    other_seed = SamplingParams(temperature=1.0, max_tokens=16, seed=43, ignore_eos=True)
    assert llm.generate([p], other_seed)[0].token_ids != alone


def test_n_samples_differ_and_are_reproducible(llm):
    p = prompts([20], seed=7)[0]
    params = SamplingParams(temperature=1.0, max_tokens=12, seed=3, n=3, ignore_eos=True)
    a = [c.token_ids for c in llm.generate([p], params)[0].outputs]
    b = [c.token_ids for c in llm.generate([p], params)[0].outputs]
    assert a == b and len({tuple(x) for x in a}) == 3


def test_stop_token_ids_and_min_tokens(llm):
    p = prompts([15], seed=8)[0]
    free = llm.generate([p], SamplingParams(temperature=0, max_tokens=20, ignore_eos=True))
    toks = free[0].token_ids
    stop_at = toks[5]
    first = toks.index(stop_at)
    out = llm.generate([p], SamplingParams(temperature=0, max_tokens=20, stop_token_ids=[stop_at]))
    assert out[0].token_ids == toks[: first + 1] and out[0].outputs[0].finish_reason == "stop"
    late = SamplingParams(temperature=0, max_tokens=20, stop_token_ids=[stop_at],
                          min_tokens=first + 2)
    out = llm.generate([p], late)[0]
    assert len(out.token_ids) >= first + 2 and stop_at not in out.token_ids[: first + 1]


def test_stop_string_truncates_text(llm):
    p = prompts([15], seed=9)[0]
    free = llm.generate([p], SamplingParams(temperature=0, max_tokens=24, ignore_eos=True))[0]
    text = free.text
    assert len(text) > 6
    stop = text[len(text) // 2 : len(text) // 2 + 3]
    out = llm.generate([p], SamplingParams(temperature=0, max_tokens=24, stop=[stop]))[0]
    assert out.outputs[0].finish_reason == "stop"
    assert out.text == text[: text.find(stop)]


def test_logprobs_of_chosen_tokens(llm):
    p = prompts([10], seed=10)[0]
    out = llm.generate([p], SamplingParams(temperature=0, max_tokens=5, logprobs=True))[0]
    lps = out.outputs[0].logprobs
    assert len(lps) == len(out.token_ids) and all(lp <= 0 for lp in lps)


def test_bad_requests_get_clear_errors(llm):
    eng = llm.engine
    with pytest.raises(RequestError, match="max_model_len"):
        eng.add_request("long", [1] * eng.max_model_len, SamplingParams())
    with pytest.raises(RequestError, match="empty"):
        eng.add_request("empty", [], SamplingParams())
    with pytest.raises(RequestError, match="outside the vocabulary"):
        eng.add_request("vocab", [10**9], SamplingParams())
    eng.add_request("dup", [1, 2], SamplingParams())
    with pytest.raises(RequestError, match="already in use"):
        eng.add_request("dup", [1, 2], SamplingParams())
    assert eng.abort("dup") and not eng.has_unfinished()
    assert eng.blocks.num_free_blocks == eng.blocks.num_blocks


def test_a_bad_prompt_fails_the_whole_call_and_leaves_nothing_queued(llm):
    good = prompts([5], seed=11)[0]
    with pytest.raises(RequestError, match="outside the vocabulary"):
        llm.generate([good, [10**9]], SamplingParams(max_tokens=2))
    assert not llm.engine.has_unfinished() and not llm.engine.seqs
