"""Disaggregated across processes: prefill on cuda:0, KV over cuda_ipc / shm_ring, decode on
cuda:1 in another process (cuda:0 too on a one-GPU machine); the tokens equal a collocated
run."""

from __future__ import annotations

import random

import pytest
import torch
import torch.multiprocessing as mp

NUM_NEW = 24
LENGTHS = [7, 40, 129]
DECODE_DEVICE = "cuda:1" if torch.cuda.device_count() > 1 else "cuda:0"


def _engine(path: str, device: str, dtype: str):
    from services.worker.engine import LLM

    # no prefix cache: the collocated rerun must compute the prompt as the prefill worker did
    # (a cache hit computes only the last token, which in bf16 rounds differently)
    return LLM(path, device=device, dtype=dtype, num_kv_blocks=512,
               enable_prefix_caching=False).engine


def _drain(engine) -> list:
    events = []
    while engine.has_unfinished():
        events += engine.step()
    return events


def _prefill(path, dtype, transport, to_decode, from_decode):
    from common.transport import make_transport
    from services.worker.engine import SamplingParams

    torch.cuda.set_device(0)
    eng = _engine(path, "cuda:0", dtype)
    t = make_transport(transport, eng.runner.kv_pool, worker="p")
    to_decode.put(t.export())
    params = SamplingParams(temperature=0, max_tokens=NUM_NEW, ignore_eos=True)
    while (job := from_decode.get(timeout=120)) is not None:
        rid, prompt = job
        eng.add_request(rid, prompt, params, prefill_only=True)
        _drain(eng)
        (seq,) = eng.take_prefilled()
        nb = -(-len(prompt) // eng.config.block_size)
        handle = t.send(rid, seq.block_table[:nb])
        t.wait_sent(handle)  # the copies ran (shm_ring) / the KV is written (cuda_ipc)
        to_decode.put((handle, list(seq.token_ids)))
        assert from_decode.get(timeout=120) == ("ack", rid)
        t.release(handle)
        eng.release(rid)
    t.close()


def _decode(path, dtype, transport, prompts, to_prefill, from_prefill, results):
    from common.transport import make_transport
    from services.worker.engine import SamplingParams

    torch.cuda.set_device(torch.device(DECODE_DEVICE))
    eng = _engine(path, DECODE_DEVICE, dtype)
    t = make_transport(transport, eng.runner.kv_pool, worker="d")
    export = from_prefill.get(timeout=300)
    params = SamplingParams(temperature=0, max_tokens=NUM_NEW, ignore_eos=True)
    disagg, colloc = [], []
    for i, prompt in enumerate(prompts):
        rid = f"r{i}"
        dst = eng.reserve(rid, len(prompt))
        to_prefill.put((rid, prompt))
        handle, token_ids = from_prefill.get(timeout=300)
        t.recv(export, handle, dst)
        to_prefill.put(("ack", rid))
        eng.add_prefilled(rid, token_ids, len(prompt), params)
        disagg.append([token_ids[-1]] + [e.token_id for e in _drain(eng)])
        eng.add_request(f"c{i}", prompt, params)  # the same request, collocated here
        colloc.append([e.token_id for e in _drain(eng)])
    to_prefill.put(None)
    results.put((disagg, colloc, eng.blocks.num_free_blocks == eng.blocks.num_blocks))
    t.close()


@pytest.mark.parametrize("transport", ["cuda_ipc", "shm_ring"])
@pytest.mark.parametrize("shape, dtype", [("tiny-qwen3", "float32"),
                                          ("qwen2.5-1.5b", "bfloat16")])
def test_disaggregated_equals_collocated_across_processes(tmp_path_factory, transport, shape,
                                                          dtype):
    from services.worker.models.random_model import tiny_test_model, write_random_model

    root = tmp_path_factory.getbasetemp() / "disagg-models"
    if shape.startswith("tiny"):
        path = tiny_test_model(shape, root, None)
    else:
        path = root / shape
        if not (path / "config.json").exists():
            write_random_model(path, shape, dtype=dtype, device="cuda:0")
    rng = random.Random(0)
    prompts = [[rng.randrange(500) for _ in range(n)] for n in LENGTHS]
    ctx = mp.get_context("spawn")
    to_p, to_d, results = ctx.Queue(), ctx.Queue(), ctx.Queue()
    p = ctx.Process(target=_prefill, args=(str(path), dtype, transport, to_d, to_p))
    d = ctx.Process(target=_decode,
                    args=(str(path), dtype, transport, prompts, to_p, to_d, results))
    p.start()
    d.start()
    disagg, colloc, all_free = results.get(timeout=600)
    d.join(60)
    p.join(60)
    assert p.exitcode == 0 and d.exitcode == 0
    assert all_free
    assert disagg == colloc
