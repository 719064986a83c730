# ruff: noqa: F811  (test parameters name the fixtures imported from gateway_mesh)
"""The gateway's OpenAI-compatible HTTP API over real sockets, with a fake router
(gateway_mesh.py), and its shutdown."""

from __future__ import annotations

import json
import socket
import threading
import time
from typing import Any

import openai
import pytest
import zmq

from common.protocol import (
    AbortRequest,
    Error,
    RouteRequest,
)
from tests.unit.gateway_mesh import (  # noqa: F401  (fixtures: pytest finds them by name)
    HOLD_SEED,
    REPLY_TEXT,
    TIMEOUT_S,
    fresh_router_log,
    http_json,
    mesh,
    model_dir,
    recv,
    running_mesh,
    submit,
    tokenizer,
)


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


def test_http_health_and_bad_json(mesh) -> None:
    assert http_json(mesh, "/health") == (200, {"status": "ok"})
    code, body = http_json(mesh, "/v1/completions", b"{not json")
    assert code == 400 and set(body["error"]) == {"message", "type", "param", "code"}
    code, body = http_json(mesh, "/v1/completions", b'{"max_tokens": 3}')
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
            http_json((gw, router), "/v1/completions", body)))
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
