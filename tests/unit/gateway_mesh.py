"""A gateway over real sockets, with a fake router/worker playing the rest of the mesh: the
fixtures and helpers of test_gateway.py, test_gateway_http.py and test_gateway_process.py.

The gateway runs in a thread of this process (its loop, its sockets, its HTTP server); the
fake router binds the router's inbox and answers each RouteRequest by pushing REPLY_TEXT's
tokens to the gateway's inbox, one token per Tokens message, unless the request's seed is
HOLD_SEED (then it only records it, for abort and deadline tests). A test module takes the
fixtures by importing them (model_dir, tokenizer, mesh, fresh_router_log, client).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import json
import queue
import socket
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import zmq

from common.config import MeshConfig, WorkerConfig
from common.protocol import (
    Accepted,
    Message,
    ProtocolError,
    RouteRequest,
    Submit,
    TokenDelta,
    Tokens,
    decode_batch,
    encode,
)
from services.gateway.main import Gateway

REPLY_TEXT = " Hello, world! 😀 中文 ok"
HOLD_SEED = 4242
TIMEOUT_S = 5.0


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class FakeRouter:
    """Binds the router's inbox; records what arrives; plays the worker for RouteRequests."""

    def __init__(self, cfg: MeshConfig, reply_ids: list[int], eos_id: int):
        self.ctx = zmq.Context()
        self.pull = self.ctx.socket(zmq.PULL)
        self.pull.bind(cfg.router_inbox)
        self.push = self.ctx.socket(zmq.PUSH)
        self.push.connect(cfg.gateway_inbox)
        self.reply_ids = reply_ids
        self.eos_id = eos_id
        self.received: queue.Queue[Message] = queue.Queue()
        self.stopping = False
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        while not self.stopping:
            if not self.pull.poll(50):
                continue
            for msg in decode_batch(self.pull.recv_multipart()):
                assert not isinstance(msg, ProtocolError), msg
                self.received.put(msg)
                if isinstance(msg, RouteRequest) and msg.sampling.get("seed") != HOLD_SEED:
                    self._answer(msg)
        self.pull.close(0)
        self.push.close(0)

    def _answer(self, req: RouteRequest) -> None:
        ids = self.reply_ids + [self.eos_id]
        for index in range(req.sampling["n"]):
            for k, tok in enumerate(ids):
                last = k == len(ids) - 1
                self.send(Tokens(rid=req.rid, index=index, token_ids=[tok],
                                 finish_reason="stop" if last else None,
                                 logprobs=[-0.5] if req.sampling["logprobs"] else None))

    def send(self, msg: Message) -> None:
        self.push.send_multipart(encode(msg))

    def expect(self, kind: type[Message], rid: str | None = None) -> Message:
        deadline = time.monotonic() + TIMEOUT_S
        while time.monotonic() < deadline:
            try:
                msg = self.received.get(timeout=0.1)
            except queue.Empty:
                continue
            if isinstance(msg, kind) and (rid is None or msg.rid == rid):
                return msg
        raise AssertionError(f"the router got no {kind.__name__} for {rid}")

    def close(self) -> None:
        self.stopping = True
        self.thread.join()
        self.ctx.term()


@pytest.fixture(scope="module")
def model_dir(tiny_model) -> Path:
    return tiny_model("tiny-qwen3")


@pytest.fixture(scope="module")
def tokenizer(model_dir: Path) -> Any:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(model_dir))


@contextlib.contextmanager
def running_mesh(model_dir: Path, tokenizer: Any, run_dir: Path
                 ) -> Iterator[tuple[Gateway, FakeRouter]]:
    """A gateway in a thread (its own loop) and a fake router, on fresh ports."""
    cfg = MeshConfig(model=str(model_dir), run_dir=str(run_dir),
                     gateway_zmq=f"tcp://127.0.0.1:{free_port()}",
                     gateway_http=f"127.0.0.1:{free_port()}",
                     workers=[WorkerConfig("colloc0", "collocated")],
                     heartbeat_s=0.2, request_timeout_s=1.0)
    cfg.run_path.mkdir(parents=True, exist_ok=True)
    reply_ids = tokenizer.encode(REPLY_TEXT, add_special_tokens=False)
    router = FakeRouter(cfg, reply_ids, tokenizer.eos_token_id)
    gw = Gateway(cfg, tokenizer=tokenizer)
    thread = threading.Thread(target=lambda: asyncio.run(gw.serve()), daemon=True)
    thread.start()
    try:
        assert gw.ready.wait(TIMEOUT_S)
        yield gw, router
        gw.request_stop()
        thread.join(TIMEOUT_S)
        assert not thread.is_alive()
        assert not (cfg.run_path / "status" / "gateway.json").exists()
    finally:
        gw.request_stop()
        router.close()


@pytest.fixture(scope="module")
def mesh(model_dir: Path, tokenizer: Any, tmp_path_factory: pytest.TempPathFactory
         ) -> Iterator[tuple[Gateway, FakeRouter]]:
    with running_mesh(model_dir, tokenizer, tmp_path_factory.mktemp("run")) as m:
        yield m


@pytest.fixture(autouse=True)
def fresh_router_log(request: pytest.FixtureRequest) -> None:
    """Each test sees only what the router got during it."""
    if "mesh" in request.fixturenames:
        router = request.getfixturevalue("mesh")[1]
        while not router.received.empty():
            router.received.get_nowait()


@pytest.fixture
def client(mesh: tuple[Gateway, FakeRouter]) -> Iterator[zmq.Socket]:
    ctx = zmq.Context.instance()
    sock = ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.connect(mesh[0].cfg.gateway_zmq)
    yield sock
    sock.close()


_unread: dict[zmq.Socket, collections.deque] = {}  # per client: the rest of a batch


def recv(sock: zmq.Socket) -> Message:
    unread = _unread.setdefault(sock, collections.deque())
    if not unread:
        assert sock.poll(int(TIMEOUT_S * 1000)), "no reply from the gateway"
        unread.extend(decode_batch(sock.recv_multipart()))
    msg = unread.popleft()
    assert not isinstance(msg, ProtocolError), msg
    return msg


def collect(sock: zmq.Socket, n: int = 1) -> dict[int, list[TokenDelta]]:
    """Deltas per completion until each of `n` has finished."""
    out: dict[int, list[TokenDelta]] = {}
    done: set[int] = set()
    while len(done) < n:
        msg = recv(sock)
        assert isinstance(msg, TokenDelta), msg
        out.setdefault(msg.index, []).append(msg)
        if msg.finish_reason is not None:
            done.add(msg.index)
    return out


def submit(sock: zmq.Socket, **kw: Any) -> Accepted:
    sock.send_multipart(encode(Submit(**kw)))
    msg = recv(sock)
    assert isinstance(msg, Accepted), msg
    return msg


# ---- native ZMQ API


def http_json(mesh: tuple[Gateway, FakeRouter], path: str,
              data: bytes | None = None) -> tuple[int, Any]:
    """(status, JSON body) of a request to the gateway's HTTP API (POST when data is given)."""
    req = urllib.request.Request(f"http://{mesh[0].cfg.gateway_http}{path}", data=data,
                                 headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=TIMEOUT_S) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())
