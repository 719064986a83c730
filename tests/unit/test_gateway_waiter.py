"""The gateway's wait on ZMQ sockets from asyncio (services/gateway/waiter.py)."""

from __future__ import annotations

import asyncio

import zmq

from common.protocol import Abort, encode
from common.sockets import readable
from services.gateway.waiter import SocketWaiter


def test_wakes_for_a_message_on_either_socket_and_times_out_without_one(tmp_path) -> None:
    ctx = zmq.Context()
    pulls = [ctx.socket(zmq.PULL) for _ in range(2)]
    pushes = [ctx.socket(zmq.PUSH) for _ in range(2)]
    for i, (pull, push) in enumerate(zip(pulls, pushes, strict=True)):
        pull.bind(f"ipc://{tmp_path}/s{i}")
        push.connect(f"ipc://{tmp_path}/s{i}")

    async def main() -> None:
        waiter = SocketWaiter(asyncio.get_running_loop(), pulls)
        await waiter.wait(0.05)  # nothing sent: the timeout ends it
        assert not any(readable(p) for p in pulls)
        for i in (1, 0):
            asyncio.get_running_loop().call_later(0.05, pushes[i].send_multipart,
                                                  encode(Abort(rid=str(i))))
            await waiter.wait(30.0)  # returns on the message, long before the timeout
            assert readable(pulls[i])
            pulls[i].recv_multipart()
        waiter.close()

    asyncio.run(asyncio.wait_for(main(), 20.0))
    for s in pulls + pushes:
        s.close(0)
    ctx.term()
