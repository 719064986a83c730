"""The worker's hand-off state machine (services/worker/handoff.py) with a real engine and
transport, and the sockets replaced by lists: refusals, leases, failures free everything."""

from __future__ import annotations

import time

import pytest

from common.protocol import KvAck, KvReady, RequestDone, Reserve, Reserved, Run, Tokens
from services.worker.engine import LLM, SamplingParams
from services.worker.handoff import Handoff, Leg
from tests.unit.test_engine_hf import prompts


class StubWorker:
    """What Handoff uses of services.worker.main.Worker, with outgoing messages recorded."""

    def __init__(self, engine, name: str):
        self.engine, self.name, self.address = engine, name, f"ipc://{name}"
        self.legs: dict[str, Leg] = {}
        self.sent: list[tuple[str, object]] = []
        self.out = self
        self.handoff = Handoff(self, lease_s=0.2)

    def send(self, address: str, msg: object) -> bool:
        self.sent.append((address, msg))
        return True

    def to_router(self, msg: object) -> None:
        self.sent.append(("router", msg))

    def to_gateway(self, msg: object) -> None:
        self.sent.append(("gateway", msg))

    def fail(self, rid: str, error: str) -> None:
        self.engine.abort(rid)
        self.handoff.forget(rid)
        self.legs.pop(rid, None)
        self.to_router(RequestDone(rid=rid, worker=self.name, error=error))

    def of(self, kind: type) -> list:
        return [m for _, m in self.sent if isinstance(m, kind)]


@pytest.fixture()
def pair(tiny_model):
    path = str(tiny_model("tiny-llama"))
    make = lambda name: StubWorker(LLM(path, num_kv_blocks=32, block_size=8).engine, name)  # noqa: E731
    p, d = make("p"), make("d")
    yield p, d
    p.handoff.close()
    d.handoff.close()


def free(w: StubWorker) -> bool:
    return w.engine.blocks.num_free_blocks == w.engine.blocks.num_blocks


def test_full_hand_off_over_shm_ring_then_ack_frees_the_prefill_side(pair):
    p, d = pair
    prompt = prompts([21], seed=20)[0]
    sampling = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True).to_dict()
    d.handoff.on_reserve(Reserve(rid="r", num_tokens=len(prompt), lease_s=5))
    (reserved,) = d.of(Reserved)
    assert reserved.ok and len(reserved.block_ids) == 3
    run = Run(rid="r", token_ids=prompt, sampling=sampling, dest="d", dest_address=d.address,
              dest_block_ids=reserved.block_ids, transport="shm_ring")
    p.legs["r"] = Leg("r", "prefill", run=run)
    p.engine.add_request("r", prompt, SamplingParams.from_dict(sampling), prefill_only=True)
    while p.engine.has_unfinished():
        p.engine.step()
    p.handoff.ship(p.engine.take_prefilled())
    (ready,) = p.of(KvReady)
    d.handoff.on_kv_ready(ready)
    (ack,) = d.of(KvAck)
    assert ack.ok and d.of(Tokens)[0].token_ids == [ready.token_ids[-1]]
    p.handoff.on_ack(ack)
    assert free(p) and not p.handoff.outgoing and "r" not in p.legs


def test_kv_without_reservation_is_refused(pair):
    p, d = pair
    d.handoff.on_kv_ready(KvReady(rid="x", src_address="ipc://p", transport="shm_ring"))
    (ack,) = d.of(KvAck)
    assert not ack.ok and "no reservation" in ack.reason


def test_bad_handle_fails_the_request_and_frees_the_reservation(pair):
    _, d = pair
    d.handoff.on_reserve(Reserve(rid="y", num_tokens=10, lease_s=5))
    d.handoff.on_kv_ready(KvReady(rid="y", src_address="ipc://p", transport="shm_ring",
                                  token_ids=[1] * 11, num_prompt_tokens=10,
                                  handle={"ring": "nope"}))
    (ack,) = d.of(KvAck)
    assert not ack.ok and "hand-off failed" in ack.reason
    assert d.of(RequestDone)[0].error and free(d)


def test_reservation_lease_expires(pair):
    _, d = pair
    d.handoff.on_reserve(Reserve(rid="z", num_tokens=10, lease_s=0.05))
    assert not free(d)
    time.sleep(0.1)
    d.handoff.expire()
    assert free(d) and not d.handoff.reserved


def test_unacked_prefill_expires_and_fails(pair):
    p, _ = pair
    prompt = prompts([12], seed=21)[0]
    run = Run(rid="w", token_ids=prompt, sampling={"max_tokens": 4}, dest="d",
              dest_address="ipc://d", transport="shm_ring")
    p.legs["w"] = Leg("w", "prefill", run=run)
    p.engine.add_request("w", prompt, SamplingParams(max_tokens=4), prefill_only=True)
    while p.engine.has_unfinished():
        p.engine.step()
    p.handoff.ship(p.engine.take_prefilled())
    assert p.of(KvReady) and not free(p)
    time.sleep(0.3)  # the stub's lease is 0.2 s
    p.handoff.expire()
    assert free(p) and "lease expired" in p.of(RequestDone)[0].error
