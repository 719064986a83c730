"""The gateway over real sockets, with a fake router/worker playing the rest of the mesh.

The gateway runs in a thread of this process (its loop, its sockets, its HTTP server); the
fake router binds the router's inbox and answers each RouteRequest by pushing REPLY_TEXT's
tokens to the gateway's inbox, one token per Tokens message, unless the request's seed is
HOLD_SEED (then it only records it, for abort and deadline tests).
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

import msgpack
import openai
import pytest
import zmq

from common.config import MeshConfig, WorkerConfig
from common.protocol import (
    PROTOCOL_VERSION,
    Abort,
    AbortRequest,
    Accepted,
    Error,
    Message,
    ProtocolError,
    RequestDone,
    RouteRequest,
    Submit,
    TokenDelta,
    Tokens,
    decode_batch,
    encode,
    encode_batch,
)
from services.gateway import zmq_frontend
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
def test_stream_submit_accepted_deltas_finish(mesh, client, tokenizer) -> None:
    gw, router = mesh
    acc = submit(client, prompt="hi there", sampling={"max_tokens": 8}, client_tag="t1")
    assert acc.client_tag == "t1"
    assert acc.num_prompt_tokens == len(tokenizer.encode("hi there", add_special_tokens=False))
    route = router.expect(RouteRequest, acc.rid)
    assert route.token_ids == tokenizer.encode("hi there", add_special_tokens=False)
    assert route.sampling["max_tokens"] == 8 and route.route == "auto"
    deltas = collect(client)[0]
    assert all("\ufffd" not in d.text for d in deltas)
    assert "".join(d.text for d in deltas) == REPLY_TEXT
    assert deltas[-1].finish_reason == "stop"
    assert sum(len(d.token_ids) for d in deltas) == len(router.reply_ids) + 1
    assert acc.rid not in gw.requests


def test_non_stream_n2_and_token_ids_prompt(mesh, client) -> None:
    _, router = mesh
    acc = submit(client, token_ids=[1, 2, 3], sampling={"n": 2}, stream=False)
    assert acc.num_prompt_tokens == 3
    assert router.expect(RouteRequest, acc.rid).token_ids == [1, 2, 3]
    out = collect(client, n=2)
    assert sorted(out) == [0, 1]
    for deltas in out.values():
        assert len(deltas) == 1
        assert deltas[0].text == REPLY_TEXT and deltas[0].finish_reason == "stop"


def test_chat_messages_use_the_template(mesh, client, tokenizer) -> None:
    _, router = mesh
    messages = [{"role": "user", "content": "hi"}]
    acc = submit(client, messages=messages)
    want = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    route = router.expect(RouteRequest, acc.rid)
    assert tokenizer.decode(route.token_ids) == want
    collect(client)


def test_stop_string_cuts_the_text(mesh, client) -> None:
    submit(client, prompt="x", sampling={"stop": ["world"]})
    deltas = collect(client)[0]
    assert "".join(d.text for d in deltas) == " Hello, "
    assert deltas[-1].finish_reason == "stop"


@pytest.mark.parametrize("sampling, param", [
    ({"temperature": -1}, "temperature"), ({"top_p": 0}, "top_p"), ({"n": 0}, "n"),
    ({"max_tokens": "many"}, "max_tokens"), ({"bogus": 1}, "bogus"),
])
def test_bad_sampling_is_an_error_naming_it(mesh, client, sampling, param) -> None:
    client.send_multipart(encode(Submit(prompt="x", sampling=sampling)))
    err = recv(client)
    assert isinstance(err, Error) and err.code == 400 and param in err.message
    submit(client, prompt="still serving")
    collect(client)


def test_malformed_frames_get_errors_and_the_gateway_lives(mesh, client) -> None:
    bad = [
        ([b"garbage"], "2 frames"),
        ([bytes((PROTOCOL_VERSION, Submit.KIND, Submit.KIND)), b"\x80"],
         "names 2 messages but the body holds 1"),
        ([bytes((PROTOCOL_VERSION + 7, Submit.KIND)), b"\x80"], "version"),
        ([bytes((PROTOCOL_VERSION, 250)), b"\x80"], "kind"),
        ([bytes((PROTOCOL_VERSION, Submit.KIND)), b"\xc1not msgpack"], "msgpack"),
        (encode(Tokens(rid="x")), "Submit and Abort"),
        (encode(Submit(prompt="x", route="sideways")), "route"),
        (encode(Submit()), "no prompt"),
        (encode(Submit(prompt="")), "empty"),
        (encode(Submit(token_ids=[10**9])), "token id"),
        (encode(Submit(messages=[{"content": "no role"}])), "role"),
    ]
    for frames, what in bad:
        client.send_multipart(frames)
        err = recv(client)
        assert isinstance(err, Error) and err.code == 400 and what in err.message, err
    submit(client, prompt="still serving")
    collect(client)


def test_a_bug_in_handling_costs_that_request_a_500_not_the_gateway(mesh, client,
                                                                     monkeypatch) -> None:
    """An unexpected exception while handling a Submit is that request's Error 500 (with its
    client tag); the gateway's socket callback goes on serving."""
    gw = mesh[0]

    def broken(*a: Any, **kw: Any) -> None:
        raise RuntimeError("boom")

    monkeypatch.setattr(gw, "submit", broken)
    client.send_multipart(encode(Submit(prompt="x", client_tag="t1")))
    err = recv(client)
    assert isinstance(err, Error) and err.code == 500 and err.client_tag == "t1", err
    assert "RuntimeError: boom" in err.message
    monkeypatch.undo()
    submit(client, prompt="still serving")
    collect(client)


def test_a_batch_from_a_client_is_served_message_by_message(mesh, client) -> None:
    """A bad message in a batch costs only itself: the others are served, in order."""
    header, _ = encode_batch([Submit()] * 3)
    body = b"".join([encode(Submit(prompt="x", client_tag="a", stream=False))[1],
                     msgpack.packb({"stream": "yes"}),
                     encode(Submit(prompt="y", client_tag="c", stream=False))[1]])
    client.send_multipart([header, body])
    first, second, third = recv(client), recv(client), recv(client)
    assert isinstance(first, Accepted) and first.client_tag == "a"
    assert isinstance(second, Error) and "message 2 of 3" in second.message
    assert "Submit.stream must be bool" in second.message
    assert isinstance(third, Accepted) and third.client_tag == "c"
    finals = [recv(client), recv(client)]
    assert all(isinstance(d, TokenDelta) and d.text == REPLY_TEXT for d in finals)
    assert {d.rid for d in finals} == {first.rid, third.rid}


def test_an_accepted_waits_for_the_first_reply_then_goes_alone(mesh, client,
                                                                monkeypatch) -> None:
    """An Accepted-only batch waits (up to ACCEPT_HOLD_S) and leaves with the next reply."""
    monkeypatch.setattr(zmq_frontend, "ACCEPT_HOLD_S", 5.0)
    client.send_multipart(encode(Submit(prompt="x", stream=False)))
    assert client.poll(int(TIMEOUT_S * 1000))
    batch = decode_batch(client.recv_multipart())  # the fake router answers at once
    assert [type(m) for m in batch] == [Accepted, TokenDelta] and batch[1].text == REPLY_TEXT
    monkeypatch.setattr(zmq_frontend, "ACCEPT_HOLD_S", 0.2)
    start = time.monotonic()
    client.send_multipart(encode(Submit(prompt="x", sampling={"seed": HOLD_SEED})))
    assert client.poll(int(TIMEOUT_S * 1000))  # no reply comes: it goes alone when due
    (acc,) = decode_batch(client.recv_multipart())
    assert isinstance(acc, Accepted) and 0.15 < time.monotonic() - start < 2.0
    client.send_multipart(encode(Abort(rid=acc.rid)))
    assert collect(client)[0][-1].finish_reason == "abort"


def test_abort_tells_the_router_and_late_tokens_are_dropped(mesh, client) -> None:
    gw, router = mesh
    acc = submit(client, prompt="x", sampling={"seed": HOLD_SEED, "n": 2})
    router.expect(RouteRequest, acc.rid)
    client.send_multipart(encode(Abort(rid=acc.rid)))
    out = collect(client, n=2)
    assert {d[-1].finish_reason for d in out.values()} == {"abort"}
    router.expect(AbortRequest, acc.rid)
    router.send(Tokens(rid=acc.rid, token_ids=[5], finish_reason="stop"))
    client.send_multipart(encode(Abort(rid="nope")))
    err = recv(client)
    assert isinstance(err, Error) and err.code == 404
    assert acc.rid not in gw.requests


def test_router_error_is_forwarded(mesh, client) -> None:
    gw, router = mesh
    acc = submit(client, prompt="x", sampling={"seed": HOLD_SEED})
    router.expect(RouteRequest, acc.rid)
    router.send(Error(rid=acc.rid, message="no worker can take it", code=503))
    err = recv(client)
    assert isinstance(err, Error) and err.code == 503 and err.rid == acc.rid
    assert acc.rid not in gw.requests
    acc = submit(client, prompt="x", sampling={"seed": HOLD_SEED})
    router.send(RequestDone(rid=acc.rid, worker="w0", error="worker w0 died"))
    err = recv(client)
    assert isinstance(err, Error) and err.rid == acc.rid and "died" in err.message
    time.sleep(0.2)  # the router ended it: the gateway must not send it an AbortRequest
    assert not any(isinstance(m, AbortRequest) for m in list(router.received.queue))


def test_deadline_is_504_and_aborts_zmq_and_http(mesh, client) -> None:
    gw, router = mesh
    results: list[tuple[int, Any]] = []
    body = json.dumps({"prompt": "x", "seed": HOLD_SEED}).encode()
    http = threading.Thread(target=lambda: results.append(_http(mesh, "/v1/completions", body)))
    start = time.monotonic()
    http.start()
    acc = submit(client, prompt="x", sampling={"seed": HOLD_SEED})
    err = recv(client)
    assert isinstance(err, Error) and err.code == 504 and err.rid == acc.rid
    assert gw.cfg.request_timeout_s - 0.1 < time.monotonic() - start < 3.0
    router.expect(AbortRequest, acc.rid)
    http.join(TIMEOUT_S)
    assert results[0][0] == 504 and "timed out" in results[0][1]["error"]["message"]


def test_status_file_is_fresh(mesh) -> None:
    gw, _ = mesh
    info = json.loads((gw.cfg.run_path / "status" / "gateway.json").read_text())
    assert info["role"] == "gateway" and info["zmq"] == gw.cfg.gateway_zmq
    assert time.time() - info["updated"] < 2.0


# ---- OpenAI-compatible HTTP
@pytest.fixture
def oai(mesh) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"http://{mesh[0].cfg.gateway_http}/v1", api_key="x",
                         max_retries=0, timeout=TIMEOUT_S)


def test_openai_completions(oai, mesh) -> None:
    r = oai.completions.create(model="m", prompt="hi", max_tokens=8, logprobs=1)
    assert r.choices[0].text == REPLY_TEXT and r.choices[0].finish_reason == "stop"
    assert r.choices[0].logprobs.token_logprobs[0] == -0.5
    assert r.usage.completion_tokens == len(mesh[1].reply_ids) + 1
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens
    assert r.id.startswith("cmpl-") and r.model == mesh[0].model_name
    chunks = list(oai.completions.create(model="m", prompt=[1, 2], stream=True, n=2))
    texts = ["".join(c.choices[0].text for c in chunks if c.choices[0].index == i)
             for i in range(2)]
    assert texts == [REPLY_TEXT, REPLY_TEXT]


def test_openai_chat_completions(oai) -> None:
    messages = [{"role": "user", "content": "hi"}]
    r = oai.chat.completions.create(model="m", messages=messages, max_completion_tokens=8,
                                    logprobs=True)
    assert r.choices[0].message.content == REPLY_TEXT
    assert [t.logprob for t in r.choices[0].logprobs.content[:2]] == [-0.5, -0.5]
    assert r.choices[0].message.role == "assistant" and r.object == "chat.completion"
    stream = oai.chat.completions.create(model="m", messages=messages, stream=True,
                                         stream_options={"include_usage": True}, stop="world")
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == " Hello, "
    assert chunks[-1].usage is not None and chunks[-1].usage.prompt_tokens > 0


def test_openai_models_and_errors(oai, mesh) -> None:
    assert [m.id for m in oai.models.list().data] == [mesh[0].model_name]
    with pytest.raises(openai.BadRequestError) as e:
        oai.completions.create(model="m", prompt="hi", temperature=-2)
    assert e.value.body["param"] == "temperature"
    with pytest.raises(openai.BadRequestError):
        oai.chat.completions.create(model="m", messages="not a list")
    with pytest.raises(openai.BadRequestError):
        oai.completions.create(model="m", prompt="hi", extra_body={"route": "nowhere"})


def _http(mesh, path: str, data: bytes | None = None) -> tuple[int, Any]:
    req = urllib.request.Request(f"http://{mesh[0].cfg.gateway_http}{path}", data=data,
                                 headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=TIMEOUT_S) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def test_http_health_and_bad_json(mesh) -> None:
    assert _http(mesh, "/health") == (200, {"status": "ok"})
    code, body = _http(mesh, "/v1/completions", b"{not json")
    assert code == 400 and set(body["error"]) == {"message", "type", "param", "code"}
    code, body = _http(mesh, "/v1/completions", b'{"max_tokens": 3}')
    assert code == 400 and body["error"]["param"] == "prompt"


def test_http_disconnect_mid_stream_aborts(mesh) -> None:
    _, router = mesh
    body = json.dumps({"prompt": "x", "seed": HOLD_SEED, "stream": True}).encode()
    host, port = mesh[0].cfg.gateway_http.rsplit(":", 1)
    with socket.create_connection((host, int(port)), timeout=TIMEOUT_S) as s:
        s.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\n"
                  b"Content-Type: application/json\r\n"
                  b"Content-Length: %d\r\n\r\n" % len(body) + body)
        assert s.recv(1024).startswith(b"HTTP/1.1 200")
        route = router.expect(RouteRequest)
    router.expect(AbortRequest, route.rid)


def test_shutdown_ends_http_and_zmq_requests(model_dir, tokenizer, tmp_path) -> None:
    with running_mesh(model_dir, tokenizer, tmp_path) as (gw, router):
        ctx = zmq.Context.instance()
        sock = ctx.socket(zmq.DEALER)
        sock.setsockopt(zmq.LINGER, 0)
        sock.connect(gw.cfg.gateway_zmq)
        acc = submit(sock, prompt="x", sampling={"seed": HOLD_SEED})
        results: list[tuple[int, Any]] = []
        body = json.dumps({"prompt": "x", "seed": HOLD_SEED}).encode()
        http = threading.Thread(target=lambda: results.append(
            _http((gw, router), "/v1/completions", body)))
        http.start()
        router.expect(RouteRequest, acc.rid)
        http_route = router.expect(RouteRequest)
        start = time.monotonic()
        gw.request_stop()
        err = recv(sock)
        assert isinstance(err, Error) and err.code == 503
        http.join(TIMEOUT_S)
        assert results and results[0][0] == 503
        for rid in (acc.rid, http_route.rid):
            router.expect(AbortRequest, rid)
        assert time.monotonic() - start < 2.0
        sock.close()
