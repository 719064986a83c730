"""KV shipped chunk by chunk while the prompt still computes (services/worker/handoff.py):
the prefill engine has a small token budget, so a prompt takes several steps; the decode
worker copies each KvChunk as it arrives. Same tokens as collocated, same bits as sent,
and every failure mid-way frees both sides."""

from __future__ import annotations

import time

import pytest
import torch

from common.protocol import (
    AbortRequest,
    KvAck,
    KvChunk,
    KvReady,
    RequestDone,
    Reserve,
    Reserved,
    Run,
    Tokens,
)
from services.worker.engine import LLM, SamplingParams
from services.worker.handoff import Leg
from tests.unit.test_engine_hf import prompts
from tests.unit.test_worker_handoff import StubWorker, free

BLOCK_SIZE, BUDGET, NUM_BLOCKS = 8, 8, 32  # a prompt of 45 tokens: 6 steps, 5 full blocks
SAMPLING = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True).to_dict()
PROMPT = prompts([45], seed=31, vocab=512)[0]  # within every tiny vocab (the GPU tests: 512)


@pytest.fixture()
def pair(tiny_model, request):
    path = str(tiny_model("tiny-llama"))
    prefix_caching = getattr(request, "param", True)
    p = StubWorker(LLM(path, num_kv_blocks=NUM_BLOCKS, block_size=BLOCK_SIZE,
                       max_num_batched_tokens=BUDGET,
                       enable_prefix_caching=prefix_caching).engine, "p")
    d = StubWorker(LLM(path, num_kv_blocks=NUM_BLOCKS, block_size=BLOCK_SIZE).engine, "d")
    yield p, d
    p.handoff.close()
    d.handoff.close()


def start(p: StubWorker, d: StubWorker, rid: str = "r", lease_s: float = 5.0,
          transport: str = "shm_ring") -> list[int]:
    d.handoff.on_reserve(Reserve(rid=rid, num_tokens=len(PROMPT), lease_s=lease_s))
    reserved = d.of(Reserved)[-1]
    assert reserved.ok
    run = Run(rid=rid, token_ids=PROMPT, sampling=SAMPLING, dest="d", dest_address=d.address,
              dest_block_ids=reserved.block_ids, transport=transport)
    p.legs[rid] = Leg(rid, "prefill", run=run)
    p.engine.add_request(rid, PROMPT, SamplingParams.from_dict(SAMPLING), prefill_only=True)
    return reserved.block_ids


def prefill_step(p: StubWorker) -> list:
    """One turn of the prefill worker's loop; the KV messages it sent during it."""
    before = len(p.sent)
    if p.engine.has_unfinished():
        p.engine.step()
    p.handoff.ship(p.engine.take_prefilled())
    return [m for _, m in p.sent[before:] if isinstance(m, (KvChunk, KvReady))]


def deliver(d: StubWorker, msg: object) -> None:
    if isinstance(msg, KvChunk):
        d.handoff.on_kv_chunk(msg)
    else:
        d.handoff.on_kv_ready(msg)


def ring_is_empty(w: StubWorker) -> bool:
    ring = w.handoff.transports["shm_ring"]
    return ring.num_free_slots == ring.num_slots


def test_chunks_ship_while_the_prompt_computes_and_decode_equals_collocated(pair, tiny_model):
    p, d = pair
    colloc = LLM(str(tiny_model("tiny-llama")), num_kv_blocks=NUM_BLOCKS,
                 block_size=BLOCK_SIZE, max_num_batched_tokens=BUDGET).engine
    colloc.add_request("c", PROMPT, SamplingParams.from_dict(SAMPLING))
    want = []
    while colloc.has_unfinished():
        want += [e.token_id for e in colloc.step()]

    dst = start(p, d)
    computing_when_sent = []
    while p.engine.has_unfinished() or p.handoff.busy:
        for msg in prefill_step(p):
            computing_when_sent.append((type(msg).__name__, p.engine.has_unfinished()))
            deliver(d, msg)
    chunks = [m for _, m in p.sent if isinstance(m, KvChunk)]
    assert [m.index for m in chunks] == list(range(len(chunks))) and len(chunks) >= 4
    assert [m.block_offset for m in chunks] == [sum(c.num_blocks for c in chunks[:i])
                                                for i in range(len(chunks))]
    # every chunk went out while later prompt chunks were still to compute
    assert computing_when_sent == [("KvChunk", True)] * len(chunks) + [("KvReady", False)]
    (ready,) = p.of(KvReady)
    assert ready.num_chunks == len(chunks) and ready.block_offset == sum(
        c.num_blocks for c in chunks)

    src = p.engine.held["r"].block_table
    assert torch.equal(d.engine.runner.kv_pool[:, :, dst], p.engine.runner.kv_pool[:, :, src])
    (ack,) = d.of(KvAck)
    assert ack.ok
    p.handoff.on_ack(ack)
    assert free(p) and ring_is_empty(p) and not p.handoff.outgoing

    got = d.of(Tokens)[0].token_ids
    while d.engine.has_unfinished():
        got += [e.token_id for e in d.engine.step()]
    assert got == want
    assert free(d) and not d.handoff.reserved


def run_until_chunks(p: StubWorker, d: StubWorker, n: int, deliver_them: bool = True) -> list:
    sent = []
    while len(sent) < n:
        msgs = prefill_step(p)
        assert not any(isinstance(m, KvReady) for m in msgs), "the prompt finished too soon"
        sent += msgs
        for m in msgs if deliver_them else []:
            deliver(d, m)
    return sent


def test_abort_mid_transfer_frees_every_block_on_both_sides(pair):
    p, d = pair
    start(p, d)
    run_until_chunks(p, d, 2)
    assert d.handoff.reserved["r"].num_chunks == 2 and not free(p) and not free(d)
    for w in (p, d):  # what Worker.handle does with AbortRequest
        msg = AbortRequest(rid="r")
        w.engine.abort(msg.rid)
        w.handoff.forget(msg.rid)
    assert free(p) and free(d) and ring_is_empty(p)
    assert not p.handoff.outgoing and not d.handoff.reserved
    while p.engine.has_unfinished() or p.handoff.busy:  # nothing more is sent
        assert not prefill_step(p)


def test_reservation_expiring_mid_transfer_refuses_the_next_chunk(pair):
    p, d = pair
    start(p, d, lease_s=0.05)
    run_until_chunks(p, d, 1)
    time.sleep(0.1)
    d.handoff.expire()
    assert free(d) and not d.handoff.reserved
    for msg in run_until_chunks(p, d, 1, deliver_them=False):
        deliver(d, msg)
    nack = d.of(KvAck)[-1]
    assert not nack.ok and "no reservation" in nack.reason
    p.handoff.on_ack(nack)
    assert free(p) and ring_is_empty(p) and "refused" in p.of(RequestDone)[0].error
    assert not p.engine.has_unfinished()


def test_a_lost_chunk_fails_the_request_on_both_sides(pair):
    p, d = pair
    start(p, d)
    first, lost, third = run_until_chunks(p, d, 3, deliver_them=False)
    deliver(d, first)
    deliver(d, third)
    nack = d.of(KvAck)[-1]
    assert not nack.ok and "chunk 1 was due" in nack.reason
    assert free(d) and "KV hand-off failed" in d.of(RequestDone)[0].error
    p.handoff.on_ack(nack)
    assert free(p) and ring_is_empty(p)


def test_prefill_lease_expires_after_chunks_without_an_ack(pair):
    p, d = pair
    start(p, d)
    while p.engine.has_unfinished() or p.handoff.busy:
        prefill_step(p)  # nothing reaches the decode worker: it died
    assert p.of(KvChunk) and p.of(KvReady) and not free(p)
    time.sleep(0.3)  # the stub's lease is 0.2 s
    p.handoff.expire()
    assert free(p) and ring_is_empty(p) and "lease expired" in p.of(RequestDone)[0].error


@pytest.mark.parametrize("pair", [True, False], indirect=True, ids=["cached", "uncached"])
def test_preempted_prefill_ships_again_if_its_blocks_changed(pair):
    p, d = pair
    dst = start(p, d)
    run_until_chunks(p, d, 2)
    (seq,) = p.engine.seqs["r"]
    shipped = list(seq.block_table[:2])
    p.engine.scheduler._preempt(seq)  # as when the prefill worker runs out of blocks
    while p.engine.has_unfinished() or p.handoff.busy:
        for msg in prefill_step(p):
            deliver(d, msg)
    offsets = [m.block_offset for m in p.of(KvChunk)]
    src = p.engine.held["r"].block_table
    if p.engine.config.enable_prefix_caching:  # the same blocks came back: nothing to redo
        assert src[:2] == shipped and offsets == list(range(len(offsets)))
    else:  # recomputed into other blocks: shipped again from block 0
        assert src[:2] != shipped and offsets[:2] == [0, 1] and 0 in offsets[2:]
    (ack,) = d.of(KvAck)
    assert ack.ok
    assert torch.equal(d.engine.runner.kv_pool[:, :, dst], p.engine.runner.kv_pool[:, :, src])
    p.handoff.on_ack(ack)
    assert free(p) and ring_is_empty(p)
