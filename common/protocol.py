"""Every message that crosses a socket, defined once, msgpack-encoded, versioned.

Wire format: two frames, `[header, payload]`. The header is two bytes,
`(PROTOCOL_VERSION, kind)`, so a receiver can route on the kind without decoding the
payload; the payload is a msgpack map of the message's fields. No pickle anywhere.
Messages are grouped by the process that receives them.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from typing import Any, ClassVar

import msgpack

PROTOCOL_VERSION = 1
MAX_PAYLOAD_BYTES = 64 * 2**20  # a 64 MiB control message is a bug or an attack


class ProtocolError(ValueError):
    """A frame that is not a valid message; the text says what was wrong."""


_REGISTRY: dict[int, type[Message]] = {}


@dataclass
class Message:
    KIND: ClassVar[int] = 0

    def __init_subclass__(cls, **kw: Any) -> None:
        super().__init_subclass__(**kw)
        if cls.KIND in _REGISTRY:
            raise TypeError(f"message kind {cls.KIND} used twice")
        _REGISTRY[cls.KIND] = cls


# ---- client <-> gateway (native ZMQ API)
@dataclass
class Submit(Message):
    """A client's request: a prompt (text, chat messages or token ids) and how to sample."""

    KIND: ClassVar[int] = 1
    prompt: str | None = None
    messages: list | None = None  # chat: [{"role": ..., "content": ...}]
    token_ids: list | None = None
    sampling: dict = field(default_factory=dict)
    stream: bool = True
    route: str = "auto"  # auto | collocated | disaggregated
    client_tag: str = ""  # echoed back, so a client can match replies to its submits


@dataclass
class Abort(Message):
    KIND: ClassVar[int] = 2
    rid: str = ""


@dataclass
class Accepted(Message):
    KIND: ClassVar[int] = 3
    rid: str = ""
    client_tag: str = ""
    num_prompt_tokens: int = 0


@dataclass
class TokenDelta(Message):
    """New tokens of one completion; `finish_reason` is set on the last delta."""

    KIND: ClassVar[int] = 4
    rid: str = ""
    index: int = 0
    token_ids: list = field(default_factory=list)
    text: str = ""
    finish_reason: str | None = None
    logprobs: list | None = None


@dataclass
class Error(Message):
    """A request failed (or a frame was bad); `rid` is empty when none applies."""

    KIND: ClassVar[int] = 5
    rid: str = ""
    message: str = ""
    code: int = 400
    client_tag: str = ""  # a rejected Submit has no rid yet: its tag says which one failed


# ---- to the router (from the gateway and the workers)
@dataclass
class RouteRequest(Message):
    KIND: ClassVar[int] = 10
    rid: str = ""
    token_ids: list = field(default_factory=list)
    sampling: dict = field(default_factory=dict)
    route: str = "auto"


@dataclass
class Heartbeat(Message):
    KIND: ClassVar[int] = 11
    worker: str = ""
    role: str = ""
    device: str = ""
    address: str = ""
    pid: int = 0
    num_running: int = 0
    num_waiting: int = 0
    num_free_blocks: int = 0
    num_blocks: int = 0
    block_size: int = 16
    transports: list = field(default_factory=list)


@dataclass
class Reserved(Message):
    """A decode worker's answer to Reserve: blocks for the KV it will receive, or why not."""

    KIND: ClassVar[int] = 12
    rid: str = ""
    worker: str = ""
    ok: bool = False
    block_ids: list = field(default_factory=list)
    reason: str = ""


@dataclass
class RequestDone(Message):
    """A leg ended: finished, aborted or failed (`error` set)."""

    KIND: ClassVar[int] = 13
    rid: str = ""
    worker: str = ""
    finish_reason: str | None = None
    num_output_tokens: int = 0
    error: str = ""


# ---- to a worker (from the router, or from a peer worker)
@dataclass
class Run(Message):
    """Prefill and decode here (collocated), or, with `dest`, prefill here and ship KV."""

    KIND: ClassVar[int] = 20
    rid: str = ""
    token_ids: list = field(default_factory=list)
    sampling: dict = field(default_factory=dict)
    dest: str = ""  # decode worker name; empty: collocated
    dest_address: str = ""
    dest_block_ids: list = field(default_factory=list)
    transport: str = ""


@dataclass
class Reserve(Message):
    KIND: ClassVar[int] = 21
    rid: str = ""
    num_tokens: int = 0
    lease_s: float = 30.0


@dataclass
class AbortRequest(Message):
    KIND: ClassVar[int] = 22
    rid: str = ""


@dataclass
class KvReady(Message):
    """Prefill -> decode: the prompt's KV is ready; go on from here. Its handle holds the
    blocks from `block_offset` on; the earlier ones came in `num_chunks` KvChunk messages."""

    KIND: ClassVar[int] = 23
    rid: str = ""
    src: str = ""
    src_address: str = ""
    token_ids: list = field(default_factory=list)  # prompt + first token
    sampling: dict = field(default_factory=dict)
    num_prompt_tokens: int = 0
    transport: str = ""
    handle: dict = field(default_factory=dict)  # transport-specific: ring slot, ...
    block_offset: int = 0
    num_chunks: int = 0


@dataclass
class KvChunk(Message):
    """Prefill -> decode, while the prompt still computes: the KV of `num_blocks` blocks,
    the reservation's blocks `[block_offset, block_offset + num_blocks)`, is ready; copy it
    now. Numbered from 0 by `index`; the KvReady that ends the transfer says how many."""

    KIND: ClassVar[int] = 25
    rid: str = ""
    src_address: str = ""
    index: int = 0
    block_offset: int = 0
    num_blocks: int = 0
    transport: str = ""
    handle: dict = field(default_factory=dict)


@dataclass
class KvAck(Message):
    """Decode -> prefill: the KV was taken (or not); the sender may free its blocks."""

    KIND: ClassVar[int] = 24
    rid: str = ""
    ok: bool = True
    reason: str = ""


# ---- to the gateway (from workers and the router)
@dataclass
class Tokens(Message):
    """A worker's new tokens for one completion; the gateway detokenizes them."""

    KIND: ClassVar[int] = 30
    rid: str = ""
    index: int = 0
    token_ids: list = field(default_factory=list)
    finish_reason: str | None = None
    logprobs: list | None = None
    worker: str = ""


# ---- encoding
def encode(msg: Message) -> list[bytes]:
    payload = msgpack.packb(
        {name: getattr(msg, name) for name in _field_types(type(msg))}, use_bin_type=True
    )
    return [bytes((PROTOCOL_VERSION, msg.KIND)), payload]


def decode(frames: list[bytes]) -> Message:
    """The message in `[header, payload]`, or ProtocolError saying what is wrong."""
    if len(frames) != 2:
        raise ProtocolError(f"expected 2 frames (header, payload), got {len(frames)}")
    header, payload = bytes(frames[0]), frames[1]
    if len(header) != 2:
        raise ProtocolError(f"header must be 2 bytes (version, kind), got {len(header)}")
    version, kind = header
    if version != PROTOCOL_VERSION:
        raise ProtocolError(f"protocol version {version}; this build speaks {PROTOCOL_VERSION}")
    cls = _REGISTRY.get(kind)
    if cls is None:
        raise ProtocolError(f"unknown message kind {kind}")
    if len(payload) > MAX_PAYLOAD_BYTES:
        raise ProtocolError(f"payload of {len(payload)} bytes; the limit is {MAX_PAYLOAD_BYTES}")
    try:
        data = msgpack.unpackb(payload, raw=False, strict_map_key=True)
    except Exception as e:  # msgpack raises several types
        raise ProtocolError(f"payload is not valid msgpack: {e}") from e
    if not isinstance(data, dict):
        raise ProtocolError(f"{cls.__name__} payload must be a map, got {type(data).__name__}")
    return _build(cls, data)


_FIELD_TYPES: dict[type, dict[str, tuple[type, ...]]] = {}


def _field_types(cls: type[Message]) -> dict[str, tuple[type, ...]]:
    """Allowed runtime types per field, resolved once per class (type hints are slow)."""
    types_ = _FIELD_TYPES.get(cls)
    if types_ is None:
        hints = typing.get_type_hints(cls)
        types_ = _FIELD_TYPES[cls] = {f.name: _allowed(hints[f.name])
                                      for f in dataclasses.fields(cls)}
    return types_


def _build(cls: type[Message], data: dict) -> Message:
    allowed = _field_types(cls)
    for name, value in data.items():
        ok = allowed.get(name)
        if ok is None:
            unknown = sorted(set(data) - set(allowed))
            raise ProtocolError(f"{cls.__name__} has no field(s) {unknown}")
        if not isinstance(value, ok) or (isinstance(value, bool) and bool not in ok):
            names = " or ".join(t.__name__ for t in ok)
            raise ProtocolError(
                f"{cls.__name__}.{name} must be {names}, got {type(value).__name__}"
            )
    return cls(**data)


def _allowed(tp: Any) -> tuple[type, ...]:
    if isinstance(tp, types.UnionType) or typing.get_origin(tp) is typing.Union:
        return tuple(t for arg in typing.get_args(tp) for t in _allowed(arg))
    if tp is type(None):
        return (type(None),)
    origin = typing.get_origin(tp) or tp
    if origin is float:
        return (float, int)
    return (origin,)


def kind_name(kind: int) -> str:
    cls = _REGISTRY.get(kind)
    return cls.__name__ if cls else f"kind {kind}"


ALL_MESSAGES: tuple[type[Message], ...] = tuple(_REGISTRY.values())
