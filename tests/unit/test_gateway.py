# ruff: noqa: F811  (test parameters name the fixtures imported from gateway_mesh)
"""The gateway's native ZeroMQ API over real sockets, with a fake router (gateway_mesh.py)."""

from __future__ import annotations

import json
import threading
import time
from typing import Any

import msgpack
import pytest

from common.protocol import (
    PROTOCOL_VERSION,
    Abort,
    AbortRequest,
    Accepted,
    Error,
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
from tests.unit.gateway_mesh import (  # noqa: F401  (fixtures: pytest finds them by name)
    HOLD_SEED,
    REPLY_TEXT,
    TIMEOUT_S,
    client,
    collect,
    fresh_router_log,
    http_json,
    mesh,
    model_dir,
    recv,
    submit,
    tokenizer,
)


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
    http = threading.Thread(target=lambda: results.append(http_json(mesh, "/v1/completions", body)))
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
