"""KV transports on CPU: shm_ring between two real processes, slots, cleanup, bad handles."""

from __future__ import annotations

import multiprocessing as mp
import multiprocessing.resource_tracker as resource_tracker
import os
import random
from collections.abc import Callable, Iterator

import msgpack
import pytest
import torch

from common.protocol import KvReady, decode, encode
from common.transport import TransportError, make_transport, transports_for
from common.transport.base import dtype_from_name, dtype_name
from common.transport.shm_ring import ShmRingTransport, slot_runs
from common.transport.shm_segment import SHM_DIR

NUM_LAYERS, NUM_BLOCKS, NUM_KV_HEADS, HEAD_DIM = 2, 24, 2, 8


def make_pool(block_size: int = 16, dtype: torch.dtype = torch.float32, seed: int = 0,
              num_blocks: int = NUM_BLOCKS) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    shape = (NUM_LAYERS, 2, num_blocks, block_size, NUM_KV_HEADS, HEAD_DIM)
    return torch.randn(shape, generator=g).to(dtype)


def block_bytes(pool: torch.Tensor, block_ids: list[int]) -> bytes:
    return pool[:, :, block_ids].contiguous().view(torch.uint8).numpy().tobytes()


def ring_path(export: dict) -> str:
    return os.path.join(SHM_DIR, export["ring"])


# decode worker, in a process of its own
def _decode_main(requests: mp.Queue, replies: mp.Queue) -> None:
    transports = {}
    try:
        while (req := requests.get(timeout=120)) is not None:
            try:
                export = msgpack.unpackb(req["export"])
                handle = decode(req["kv_ready"]).handle
                key = (tuple(req["pool_shape"]), req["dtype"])
                if key not in transports:
                    pool = torch.zeros(req["pool_shape"], dtype=dtype_from_name(req["dtype"]))
                    transports[key] = make_transport("shm_ring", pool, worker="decode")
                t = transports[key]
                t.recv(export, handle, req["dst"])
                replies.put(("ok", block_bytes(t.kv_pool, req["dst"])))
            except Exception as e:  # report it, keep serving
                replies.put(("error", repr(e)))
    finally:
        for t in transports.values():
            t.close()


@pytest.fixture(scope="module")
def decode_proc() -> Iterator[Callable[..., bytes]]:
    """`recv(export, handle, dst, pool)`: the decode process receives; its bytes of dst."""
    ctx = mp.get_context("spawn")
    requests, replies = ctx.Queue(), ctx.Queue()
    proc = ctx.Process(target=_decode_main, args=(requests, replies), daemon=True)
    proc.start()

    def recv(export: dict, handle: dict, dst: list[int], pool: torch.Tensor) -> bytes:
        requests.put({
            "export": msgpack.packb(export),
            "kv_ready": encode(KvReady(rid=handle["rid"], transport="shm_ring", handle=handle)),
            "dst": dst, "pool_shape": list(pool.shape), "dtype": dtype_name(pool.dtype),
        })
        status, payload = replies.get(timeout=120)
        assert status == "ok", payload
        return payload

    yield recv
    requests.put(None)
    proc.join(timeout=30)
    if proc.is_alive():
        proc.kill()
    assert proc.exitcode == 0


@pytest.mark.parametrize("block_size", [16, 8])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_two_processes_kv_arrives_bitwise(decode_proc, dtype, block_size):
    pool = make_pool(block_size, dtype, seed=block_size)
    rng = random.Random(block_size)
    with make_transport("shm_ring", pool, worker="prefill", num_slots=10) as p:
        export = p.export()
        sent = {}
        for rid, n in [("a", 3), ("b", 4)]:
            src = rng.sample(range(NUM_BLOCKS), n)
            sent[rid] = (src, p.send(rid, src))
        p.release(sent.pop("a")[1])
        src = rng.sample(range(NUM_BLOCKS), 5)  # no 5 consecutive free slots: two stretches
        sent["c"] = (src, p.send("c", src))
        assert sent["c"][1]["slots"] == [0, 1, 2, 7, 8]
        for src, handle in sent.values():
            dst = rng.sample(range(NUM_BLOCKS), len(src))
            assert decode_proc(export, handle, dst, pool) == block_bytes(pool, src)
            p.release(handle)
        for trial in range(3):  # random lengths, the whole ring at most
            src = [rng.randrange(NUM_BLOCKS) for _ in range(rng.randint(1, 10))]
            handle = p.send(f"r{trial}", src)
            dst = rng.sample(range(NUM_BLOCKS), len(src))
            assert decode_proc(export, handle, dst, pool) == block_bytes(pool, src)
            p.release(handle)
        assert os.path.exists(ring_path(export))
    assert not os.path.exists(ring_path(export))


def test_kv_shipped_in_chunks_arrives_bitwise(decode_proc):
    """A prompt's blocks in several sends (one per prefill chunk), each into its share of
    the destination blocks, some in several pieces: the whole arrives bit for bit."""
    pool = make_pool(8, torch.bfloat16, seed=5)
    rng = random.Random(5)
    src = rng.sample(range(NUM_BLOCKS), 11)
    dst = rng.sample(range(NUM_BLOCKS), 11)
    block_nbytes = pool[:, :, 0].numel() * pool.element_size()
    with ShmRingTransport(pool, "prefill", num_slots=16, piece_nbytes=2 * block_nbytes) as p:
        export, handles = p.export(), []
        for i, (a, b) in enumerate([(0, 4), (4, 5), (5, 11)]):
            handle = p.send(f"r#{i}", src[a:b])
            assert p.poll(handle) and handle["piece_slots"] == 2
            handles.append(handle)
            assert decode_proc(export, handle, dst[a:b], pool) == block_bytes(pool, src[a:b])
        for handle in handles:
            p.release(handle)
        assert p.num_free_slots == 16


def test_a_stale_handle_times_out_instead_of_reading_other_data():
    pool = make_pool(8)
    with ShmRingTransport(pool, "p", num_slots=4) as p, \
            ShmRingTransport(torch.zeros_like(pool), "d") as d:
        old = p.send("a", [1, 2])
        p.release(old)
        new = p.send("b", [3, 4])  # the same slots, another transfer
        assert new["slots"] == old["slots"] and new["token"] != old["token"]
        with pytest.raises(TransportError, match="handle is stale"):
            d.recv(p.export(), old, [0, 1], timeout_s=0.05)
        assert not d.kv_pool.any()
        d.recv(p.export(), new, [0, 1], wait=False)
        d.wait_received()
        assert block_bytes(d.kv_pool, [0, 1]) == block_bytes(pool, [3, 4])
        with pytest.raises(TransportError, match="piece_slots 0"):
            d.recv(p.export(), {**new, "piece_slots": 0}, [0, 1])


def test_recv_writes_only_the_destination_blocks():
    pool = make_pool(8, torch.bfloat16)
    dst_pool = torch.zeros_like(pool)
    with ShmRingTransport(pool, "p", num_slots=8) as p, ShmRingTransport(dst_pool, "d") as d:
        handle = p.send("r", [5, 1, 7])
        d.recv(p.export(), handle, [2, 0, 9])
        assert block_bytes(dst_pool, [2, 0, 9]) == block_bytes(pool, [5, 1, 7])
        others = [b for b in range(NUM_BLOCKS) if b not in (2, 0, 9)]
        assert not dst_pool[:, :, others].any()
        d.recv(p.export(), p.send("empty", []), [])  # nothing to move is fine


def test_slot_exhaustion_returns_none_and_release_makes_room():
    with make_transport("shm_ring", make_pool(), worker="p", num_slots=4) as p:
        first = p.send("a", [0, 1, 2])
        assert first["slots"] == [0, 1, 2]
        assert p.send("b", [3, 4]) is None
        assert p.num_free_slots == 1
        with pytest.raises(TransportError, match="already holds ring slots"):
            p.send("a", [5])
        p.release(first)
        p.release(first)  # a late KvAck after lease expiry: no-op
        assert p.num_free_slots == 4
        assert p.send("b", [3, 4])["slots"] == [0, 1]
        assert p.send("c", [5, 6, 7]) is None
        assert p.send("c", [5, 6]) is not None


def test_slot_runs():
    assert slot_runs([0, 1, 2, 7, 8, 4]) == [(0, 3, 0), (7, 2, 3), (4, 1, 5)]
    assert slot_runs([]) == []


def test_close_unlinks_and_the_decode_side_never_does(monkeypatch):
    registered = []
    p = ShmRingTransport(make_pool(), "p", num_slots=4)
    path = ring_path(p.export())
    assert os.path.exists(path)
    monkeypatch.setattr(resource_tracker, "register", lambda *a: registered.append(a))
    d = ShmRingTransport(torch.zeros_like(p.kv_pool), "d")
    d.recv(p.export(), p.send("r", [1]), [2])
    d.close()
    assert registered == []  # the decode side leaves the ring to its owner's tracker
    assert os.path.exists(path)
    p.close()
    p.close()
    assert not os.path.exists(path)
    with pytest.raises(TransportError, match="is closed"):
        p.send("again", [1])
    assert not [f for f in os.listdir(SHM_DIR) if f.startswith(f"nanopd_p_{os.getpid()}_")]


def test_default_ring_size_comes_from_a_byte_budget():
    pool = make_pool()
    t = ShmRingTransport(pool, "p", ring_nbytes=10 * pool[:, :, 0].numel() * 4 + 1)
    assert t.num_slots == 10 and t.block_nbytes == pool[:, :, 0].numel() * 4
    with pytest.raises(TransportError, match="raise ring_nbytes"):
        ShmRingTransport(pool, "p", ring_nbytes=100)


def test_handles_that_do_not_fit_fail_clearly():
    pool16, pool8 = make_pool(16), make_pool(8)
    with ShmRingTransport(pool16, "p16", num_slots=4) as p16, \
            ShmRingTransport(pool8, "p8", num_slots=4) as p8, \
            ShmRingTransport(torch.zeros_like(pool16), "d") as d:
        h16, h8 = p16.send("r", [1, 2]), p8.send("r", [1, 2])
        with pytest.raises(TransportError, match=r"shape \[2, 2, 8, 2, 8\].*same model"):
            d.recv(p8.export(), h8, [0, 1])
        with pytest.raises(TransportError, match="comes from another worker"):
            d.recv(p8.export(), h16, [0, 1])
        with pytest.raises(TransportError, match="dtype bfloat16"):
            d.recv({}, {**h16, "dtype": "bfloat16"}, [0, 1])
        with pytest.raises(TransportError, match="2 slots for 3 destination"):
            d.recv({}, h16, [0, 1, 2])
        with pytest.raises(TransportError, match="dst_block_ids has block id 99"):
            d.recv({}, h16, [0, 99])
        with pytest.raises(TransportError, match="names a block twice"):
            d.recv({}, h16, [3, 3])
        with pytest.raises(TransportError, match="block id 4; the pool has 4"):
            d.recv({}, {**h16, "slots": [0, 4]}, [0, 1])
        with pytest.raises(TransportError, match="transport 'cuda_ipc'"):
            d.recv({}, {**h16, "transport": "cuda_ipc"}, [0, 1])
        with pytest.raises(TransportError, match="this worker's ring is"):
            p16.release(h8)
        with pytest.raises(TransportError, match="src_block_ids has block id -1"):
            p16.send("x", [-1])
        p8.close()
        with pytest.raises(TransportError, match="not in /dev/shm"):
            d.recv({}, h8 | {"slot_shape": h16["slot_shape"]}, [0, 1])


def test_factory():
    pool = make_pool()
    with make_transport("shm_ring", pool, worker="w", num_slots=2) as t:
        assert isinstance(t, ShmRingTransport) and t.name == "shm_ring"
    with pytest.raises(TransportError, match="unknown KV transport 'nccl'"):
        make_transport("nccl", pool)
    with pytest.raises(TransportError, match="needs the KV pool on a GPU.*shm_ring"):
        make_transport("cuda_ipc", pool)
    with pytest.raises(TransportError, match="expected \\[num_layers, 2"):
        make_transport("shm_ring", pool[0])
    assert transports_for(torch.device("cpu")) == ["shm_ring"]
