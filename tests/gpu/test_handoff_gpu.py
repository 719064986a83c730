"""The worker's chunked KV hand-off on GPUs (services/worker/handoff.py), both engines in this
process: prefill on cuda:0 with a token budget below the prompt, decode on cuda:1 (cuda:0 on
a one-GPU machine), over cuda_ipc and shm_ring. The copies run on side streams behind the
prefill's queued compute; the tokens equal collocated ones and the KV arrives bit for bit."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("msgpack")  # the hand-off speaks common.protocol

from common.protocol import KvAck, KvChunk, KvReady, Tokens  # noqa: E402
from services.worker.engine import LLM, SamplingParams  # noqa: E402
from tests.unit.test_handoff_chunks import (  # noqa: E402
    BLOCK_SIZE,
    BUDGET,
    NUM_BLOCKS,
    PROMPT,
    SAMPLING,
    deliver,
    prefill_step,
    ring_is_empty,
    start,
)
from tests.unit.test_worker_handoff import StubWorker, free  # noqa: E402

DECODE_DEVICE = "cuda:1" if torch.cuda.device_count() > 1 else "cuda:0"


def engine(path: str, device: str, **kw):
    return LLM(path, device=device, dtype="float32", num_kv_blocks=NUM_BLOCKS,
               block_size=BLOCK_SIZE, **kw).engine


@pytest.fixture(scope="module")
def model_path(tmp_path_factory) -> str:
    """A tiny random model without a tokenizer: the GPU machine has no default model."""
    from services.worker.models.random_model import tiny_test_model

    return str(tiny_test_model("tiny-llama", tmp_path_factory.mktemp("handoff-gpu"), None))


@pytest.mark.parametrize("transport", ["cuda_ipc", "shm_ring"])
def test_chunked_hand_off_on_gpu_equals_collocated(model_path, transport):
    path = model_path
    colloc = engine(path, "cuda:0", max_num_batched_tokens=BUDGET)
    colloc.add_request("c", PROMPT, SamplingParams.from_dict(SAMPLING))
    want = []
    while colloc.has_unfinished():
        want += [e.token_id for e in colloc.step()]

    p = StubWorker(engine(path, "cuda:0", max_num_batched_tokens=BUDGET), "p")
    d = StubWorker(engine(path, DECODE_DEVICE), "d")
    try:
        dst = start(p, d, transport=transport)
        first_chunk_while_computing = None
        while p.engine.has_unfinished() or p.handoff.busy:
            for msg in prefill_step(p):
                if first_chunk_while_computing is None:
                    first_chunk_while_computing = p.engine.has_unfinished()
                deliver(d, msg)
        kinds = [type(m).__name__ for _, m in p.sent if isinstance(m, (KvChunk, KvReady))]
        assert kinds == ["KvChunk"] * (len(kinds) - 1) + ["KvReady"] and len(kinds) >= 4
        assert first_chunk_while_computing
        src = p.engine.held["r"].block_table
        assert torch.equal(d.engine.runner.kv_pool[:, :, dst].cpu(),
                           p.engine.runner.kv_pool[:, :, src].cpu())
        (ack,) = d.of(KvAck)
        assert ack.ok, ack.reason
        p.handoff.on_ack(ack)
        assert free(p) and not p.handoff.outgoing
        if transport == "shm_ring":
            assert ring_is_empty(p)
        got = d.of(Tokens)[0].token_ids
        while d.engine.has_unfinished():
            got += [e.token_id for e in d.engine.step()]
        assert got == want
        assert free(d)
    finally:
        d.handoff.close()
        p.handoff.close()
