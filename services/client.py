"""A native client of the gateway: a ZMQ DEALER that sends `Submit` to the gateway's ROUTER
and reads back `Accepted`, then `TokenDelta`s (the last has `finish_reason` set), or `Error`.

    from services.client import Client

    with Client("tcp://127.0.0.1:5555") as client:
        print(client.generate("What is the capital of France?", max_tokens=32).text)
        for delta in client.stream("Tell me a joke", temperature=0.7):
            print(delta.text, end="", flush=True)

Every wait has a timeout; a request given up on (timeout, or the caller stops iterating)
is aborted at the gateway.
"""

from __future__ import annotations

import uuid
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import zmq

from common.protocol import (
    Abort,
    Accepted,
    Error,
    Message,
    ProtocolError,
    Submit,
    TokenDelta,
    decode_batch,
    encode,
)

DEFAULT_ADDRESS = "tcp://127.0.0.1:5555"
DEFAULT_TIMEOUT_S = 60.0
ROUTES = ("auto", "collocated", "disaggregated")


class ClientError(RuntimeError):
    """A request failed; the text says why and, where it can, what to do."""


class GatewayError(ClientError):
    """The gateway answered with `Error`."""

    def __init__(self, message: str, code: int = 400, rid: str = ""):
        super().__init__(f"the gateway refused the request (code {code}): {message}")
        self.code, self.rid = code, rid


class ClientTimeout(ClientError):
    """Nothing came back from the gateway within the timeout."""


@dataclass
class Completion:
    rid: str = ""
    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    finish_reason: str | None = None
    num_prompt_tokens: int = 0
    texts: list[str] = field(default_factory=list)  # every completion's text when n > 1


class Client:
    """One DEALER socket to the gateway; one request at a time."""

    def __init__(self, address: str = DEFAULT_ADDRESS, timeout_s: float = DEFAULT_TIMEOUT_S):
        self.address, self.timeout_s = address, timeout_s
        self.accepted: Accepted | None = None  # the gateway's answer to the latest submit
        self._ctx = zmq.Context()
        self._sock = self._ctx.socket(zmq.DEALER)
        self._sock.setsockopt(zmq.LINGER, 200)  # an Abort gets this long to leave on close
        self._sock.connect(address)
        self._received: deque[Message | ProtocolError] = deque()  # rest of a batch

    def stream(self, prompt: str | None = None, *, chat: bool = True,
               messages: list[dict[str, str]] | None = None, route: str = "auto",
               **sampling: Any) -> Iterator[TokenDelta]:
        """Submit and yield each TokenDelta as it arrives."""
        return self._run(self._submit(prompt, chat, messages, route, sampling, stream=True))

    def generate(self, prompt: str | None = None, *, chat: bool = True,
                 messages: list[dict[str, str]] | None = None, route: str = "auto",
                 **sampling: Any) -> Completion:
        """Submit and wait for the whole answer. `text`, `token_ids` and `finish_reason` are
        those of the first completion; `texts` has one text per completion (sampling `n`)."""
        submit = self._submit(prompt, chat, messages, route, sampling, stream=False)
        out = Completion()
        texts: dict[int, str] = {}
        for delta in self._run(submit):
            out.rid = delta.rid
            texts[delta.index] = texts.get(delta.index, "") + delta.text
            if delta.index == 0:
                out.token_ids += delta.token_ids
                out.finish_reason = delta.finish_reason
        out.texts = [texts[i] for i in sorted(texts)]
        out.text = texts.get(0, "")
        out.num_prompt_tokens = self.accepted.num_prompt_tokens if self.accepted else 0
        return out

    def close(self) -> None:
        self._sock.close()
        self._ctx.term()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ---- internals
    def _submit(self, prompt: str | None, chat: bool, messages: list[dict[str, str]] | None,
                route: str, sampling: dict[str, Any], stream: bool) -> Submit:
        if route not in ROUTES:
            raise ClientError(f"route {route!r}; allowed: {', '.join(ROUTES)}")
        if messages is None and prompt is None:
            raise ClientError("give a prompt or chat messages")
        if messages is None and chat:
            messages = [{"role": "user", "content": prompt}]
        return Submit(prompt=None if messages is not None else prompt, messages=messages,
                      sampling={k: v for k, v in sampling.items() if v is not None},
                      stream=stream, route=route, client_tag=uuid.uuid4().hex)

    def _run(self, submit: Submit) -> Iterator[TokenDelta]:
        self.accepted = None
        self._sock.send_multipart(encode(submit))
        rid, finished = "", False
        num_left = int(submit.sampling.get("n", 1))  # completions still to finish
        try:
            while num_left > 0:
                msg = self._recv(rid)
                if isinstance(msg, Accepted):
                    if msg.client_tag in ("", submit.client_tag) and not rid:
                        self.accepted, rid = msg, msg.rid
                elif isinstance(msg, Error):
                    # ours: our rid, our tag, or a tag-less error before we have a rid
                    if (rid and msg.rid == rid) or msg.client_tag == submit.client_tag or (
                            not rid and not msg.rid and not msg.client_tag):
                        finished = True
                        raise GatewayError(msg.message, msg.code, msg.rid)
                elif isinstance(msg, TokenDelta) and rid and msg.rid == rid:
                    # deltas of an earlier, abandoned request on this socket are skipped
                    if msg.finish_reason is not None:
                        num_left -= 1
                    yield msg
            finished = True
        finally:
            if not finished and rid and not self._sock.closed:
                self._sock.send_multipart(encode(Abort(rid=rid)), flags=zmq.NOBLOCK)

    def _recv(self, rid: str) -> Message:
        if not self._received:
            self._received.extend(self._recv_batch(rid))
        msg = self._received.popleft()
        if isinstance(msg, ProtocolError):
            raise ClientError(f"bad reply from the gateway at {self.address}: {msg}")
        return msg

    def _recv_batch(self, rid: str) -> list[Message | ProtocolError]:
        if not self._sock.poll(int(self.timeout_s * 1000)):
            if not rid:
                raise ClientTimeout(
                    f"no answer from the gateway at {self.address} within {self.timeout_s:g} s;"
                    " is the mesh up? (nanopd status)"
                )
            raise ClientTimeout(f"the gateway at {self.address} accepted request {rid} but sent "
                                f"nothing for {self.timeout_s:g} s; the request was aborted")
        frames = self._sock.recv_multipart()
        if frames and not frames[0]:
            frames = frames[1:]  # an empty delimiter, if the gateway sends one
        try:
            return decode_batch(frames)
        except ProtocolError as e:
            raise ClientError(f"bad reply from the gateway at {self.address}: {e}") from e
