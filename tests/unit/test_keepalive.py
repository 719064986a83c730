"""The worker's keep-alive: heartbeats re-sent while the loop is inside a long step."""

from __future__ import annotations

import zmq

from common.protocol import Heartbeat, decode
from services.worker.keepalive import KeepAlive

BEAT = Heartbeat(worker="w0", role="prefill", device="cpu", address="ipc:///tmp/w0",
                 pid=1, num_running=3, num_waiting=0, num_free_blocks=10, num_blocks=20,
                 block_size=16, transports=["shm_ring"])


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_due_only_while_the_loop_is_silent_and_not_stuck():
    clock = Clock()
    ka = KeepAlive(zmq.Context.instance(), "inproc://unused", interval_s=0.5,
                   stale_after_s=10.0, clock=clock)
    clock.now += 5
    assert not ka.due(clock.now)  # nothing to vouch with yet
    ka.note(BEAT)
    assert not ka.due(clock.now + 0.4)  # the loop heartbeats on its own
    assert ka.due(clock.now + 0.6)      # a long step: re-send
    ka.sent_at = clock.now + 0.6
    assert not ka.due(clock.now + 0.9) and ka.due(clock.now + 1.2)
    assert not ka.due(clock.now + 10.5)  # silent for too long: maybe stuck, stop vouching


def test_the_thread_re_sends_the_latest_heartbeat(tmp_path):
    ctx = zmq.Context()
    address = f"ipc://{tmp_path}/router.sock"
    router = ctx.socket(zmq.PULL)
    router.bind(address)
    ka = KeepAlive(ctx, address, interval_s=0.05, stale_after_s=60.0)
    ka.note(BEAT)
    ka.start()
    try:
        assert router.poll(5000), "no heartbeat re-sent"
        assert decode(router.recv_multipart()) == BEAT
    finally:
        ka.stop()
        router.close(linger=0)
        ctx.term()
    assert ka.num_resent >= 1
