"""The gateway's callbacks on ZMQ sockets from asyncio (services/gateway/waiter.py)."""

from __future__ import annotations

import asyncio

import zmq

from common.protocol import Abort, encode
from common.sockets import recv_nowait
from services.gateway.waiter import SocketReaders


def test_each_socket_calls_its_callback_per_message_and_at_the_start(tmp_path) -> None:
    ctx = zmq.Context()
    pulls = [ctx.socket(zmq.PULL) for _ in range(2)]
    pushes = [ctx.socket(zmq.PUSH) for _ in range(2)]
    for i, (pull, push) in enumerate(zip(pulls, pushes, strict=True)):
        pull.bind(f"ipc://{tmp_path}/s{i}")
        push.connect(f"ipc://{tmp_path}/s{i}")
    pushes[0].send_multipart(encode(Abort(rid="early")))  # before the watch: read at the start

    async def main() -> None:
        loop = asyncio.get_running_loop()
        got: list[tuple[int, str]] = []
        arrived = asyncio.Event()

        def on_ready(i: int) -> None:  # drain: the last look re-arms the edge-triggered fd
            while (frames := recv_nowait(pulls[i])) is not None:
                got.append((i, frames[1].decode(errors="replace")))
                arrived.set()

        readers = SocketReaders(loop)
        readers.add(pulls[0], lambda: on_ready(0))
        readers.add(pulls[1], lambda: on_ready(1))
        await asyncio.wait_for(arrived.wait(), 10.0)
        assert [i for i, _ in got] == [0]
        for i in (1, 0, 1):
            arrived.clear()
            loop.call_later(0.02, pushes[i].send_multipart, encode(Abort(rid=str(i))))
            await asyncio.wait_for(arrived.wait(), 10.0)  # woken by the message alone
            assert got[-1][0] == i
        assert len(got) == 4
        readers.close()
        pushes[0].send_multipart(encode(Abort(rid="late")))
        await asyncio.sleep(0.1)
        assert len(got) == 4  # closed: no more callbacks

    asyncio.run(asyncio.wait_for(main(), 20.0))
    for s in pulls + pushes:
        s.close(0)
    ctx.term()
