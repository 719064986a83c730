"""KV hand-off inside one process: prefill on one engine, decode on another, same tokens."""

from __future__ import annotations

import pytest

from services.worker.engine import LLM, SamplingParams
from services.worker.engine.engine import RequestError
from tests.unit.test_engine_hf import prompts


@pytest.fixture(scope="module")
def engines(tiny_model):
    path = str(tiny_model("tiny-llama"))
    make = lambda: LLM(path, num_kv_blocks=64, block_size=8).engine  # noqa: E731
    return make(), make(), make()


def run(engine, limit=500):
    events = []
    for _ in range(limit):
        if not engine.has_unfinished():
            break
        events += engine.step()
    return events


def test_prefill_then_decode_elsewhere_equals_collocated(engines):
    prefill, decode, colloc = engines
    params = SamplingParams(temperature=0, max_tokens=20, ignore_eos=True)
    p = prompts([29], seed=12)[0]
    colloc.add_request("c", p, params)
    want = [e.token_id for e in run(colloc)]

    dst = decode.reserve("r", len(p))
    assert dst is not None and len(dst) == -(-len(p) // 8)
    prefill.add_request("r", p, params, prefill_only=True)
    first = run(prefill)
    assert [e.token_id for e in first] == want[:1] and first[0].finish_reason is None
    (seq,) = prefill.take_prefilled()
    src = seq.block_table
    # the transport's job, done by hand: every layer's K and V of those blocks
    decode.runner.kv_pool[:, :, dst] = prefill.runner.kv_pool[:, :, src]
    decode.add_prefilled("r", seq.token_ids, len(p), params)
    assert prefill.release("r") and prefill.blocks.num_free_blocks == 64
    rest = run(decode)
    assert want == want[:1] + [e.token_id for e in rest]
    assert rest[-1].finish_reason == "length"
    assert decode.blocks.num_free_blocks == 64


def test_reservations_refuse_cleanly_and_abort_frees_everything(engines):
    prefill, decode, _ = engines
    assert decode.reserve("x", 30) is not None
    with pytest.raises(RequestError, match="already in use"):
        decode.reserve("x", 30)
    assert decode.abort("x") and decode.blocks.num_free_blocks == 64
    with pytest.raises(RequestError, match="no reservation"):
        decode.add_prefilled("x", [1, 2], 1, SamplingParams())
    with pytest.raises(RequestError, match="max_model_len"):
        decode.reserve("huge", 10_000)
    assert decode.reserve("a", 500) is not None
    assert decode.reserve("b", 500) is None  # pool short now: the router picks another
    decode.abort("a")
    decode.abort("b")
    assert decode.blocks.num_free_blocks == 64
    prefill.add_request("y", prompts([12], seed=13)[0], SamplingParams(max_tokens=5),
                        prefill_only=True)
    run(prefill)
    assert prefill.abort("y") and prefill.blocks.num_free_blocks == 64
    assert not prefill.take_prefilled()


def test_first_token_that_ends_the_request_is_not_handed_off(engines):
    prefill, _, _ = engines
    prefill.add_request("z", prompts([9], seed=14)[0], SamplingParams(max_tokens=1),
                        prefill_only=True)
    events = run(prefill)
    assert events[-1].finish_reason == "length"
    assert not prefill.take_prefilled() and prefill.blocks.num_free_blocks == 64
