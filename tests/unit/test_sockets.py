"""Outboxes queue and flush one batch per peer; an inbox survives bad frames."""

from __future__ import annotations

import time

import msgpack
import pytest
import zmq

from common import sockets
from common.protocol import (
    MAX_BATCH,
    PROTOCOL_VERSION,
    Abort,
    AbortRequest,
    Submit,
    decode_batch,
    encode,
)
from common.sockets import Batch, Inbox, Outbox, Outboxes

TIMEOUT_MS = 5000


@pytest.fixture
def ctx():
    c = zmq.Context()
    yield c
    c.destroy(linger=0)


def recv_all(inbox: Inbox, num_msgs: int) -> list:
    out: list = []
    deadline = time.monotonic() + TIMEOUT_MS / 1000
    while len(out) < num_msgs and time.monotonic() < deadline:
        inbox.wait(100)
        out += inbox.drain()
    return out


def test_nothing_leaves_before_flush_then_one_batch_per_peer(ctx, tmp_path):
    a = Inbox(ctx, f"ipc://{tmp_path}/a")
    raw = ctx.socket(zmq.PULL)  # sees the multipart messages themselves
    raw.bind(f"ipc://{tmp_path}/b")
    out = Outboxes(ctx)
    for i in range(5):
        out.send(a.address, Abort(rid=f"a{i}"))
    for i in range(3):
        out.send(f"ipc://{tmp_path}/b", AbortRequest(rid=f"b{i}"))
    assert not a.wait(200) and not raw.poll(0)
    assert out.flush() == []
    assert recv_all(a, 5) == [Abort(rid=f"a{i}") for i in range(5)]
    assert raw.poll(TIMEOUT_MS)
    frames = raw.recv_multipart()
    assert len(frames) == 2 and frames[0] == bytes((PROTOCOL_VERSION, *[AbortRequest.KIND] * 3))
    assert decode_batch(frames) == [AbortRequest(rid=f"b{i}") for i in range(3)]
    assert out.flush() == []  # nothing queued: nothing sent
    assert not raw.poll(200)
    out.close()
    raw.close()
    a.close()


def test_long_queues_are_cut_into_batches_of_max_batch(ctx, tmp_path):
    raw = ctx.socket(zmq.PULL)
    raw.bind(f"ipc://{tmp_path}/b")
    box = Outbox(ctx, f"ipc://{tmp_path}/b")
    for i in range(MAX_BATCH + 3):
        box.send(Abort(rid=str(i)))
    box.flush()
    sizes = []
    for _ in range(2):
        assert raw.poll(TIMEOUT_MS)
        sizes.append(len(decode_batch(raw.recv_multipart())))
    assert sizes == [MAX_BATCH, 3]
    box.close()
    raw.close()


def test_batches_are_cut_at_the_payload_limit_too(monkeypatch):
    monkeypatch.setattr(sockets, "MAX_PAYLOAD_BYTES", 100)
    batch = Batch()
    msgs = [Abort(rid="x" * 40) for _ in range(5)]  # 47 bytes packed: two fit in 100
    for m in msgs:
        batch.add(m)
    parts = batch.frames()
    assert [len(carried) for _, carried in parts] == [2, 2, 1]
    assert all(len(frames[1]) <= 100 for frames, _ in parts)
    assert [m for frames, _ in parts for m in decode_batch(frames)] == msgs


def test_bad_frames_are_dropped_and_the_inbox_goes_on(ctx, tmp_path):
    inbox = Inbox(ctx, f"ipc://{tmp_path}/a")
    push = ctx.socket(zmq.PUSH)
    push.connect(inbox.address)
    push.send_multipart([b"\x02"])  # no batch at all
    push.send_multipart([bytes((PROTOCOL_VERSION, Abort.KIND, Abort.KIND)),
                         msgpack.packb({"rid": 5}) + encode(Abort(rid="ok"))[1]])
    push.send_multipart(encode(Submit(prompt="after")))
    assert recv_all(inbox, 2) == [Abort(rid="ok"), Submit(prompt="after")]
    push.close()
    inbox.close()


def test_a_full_queue_returns_what_was_dropped(ctx, tmp_path):
    box = Outbox(ctx, f"ipc://{tmp_path}/nobody")  # no peer ever binds: nothing drains
    box.sock.setsockopt(zmq.SNDHWM, 1)
    sent: list = []
    dropped: list = []
    for i in range(50):  # the pipe takes a few batches before the mark holds
        msg = Abort(rid=str(i))
        box.send(msg)
        sent.append(msg)
        dropped += box.flush()
        if dropped:
            break
    assert dropped == [sent[-1]]
    assert not box.writable()
    box.sock.setsockopt(zmq.LINGER, 0)
    box.close()
