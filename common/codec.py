"""The wire format of every control message: msgpack maps in batches, versioned.

One ZeroMQ multipart message of two frames, `[header, body]`, carries a batch of N >= 1
messages. The header is `PROTOCOL_VERSION` then one kind byte per message, so a receiver
can route on the kinds without decoding the body; the body is N msgpack maps back to back,
one per message, of its fields. One message is `[(version, kind), payload]`. A sender
flushes what it queued for one peer as one batch: two frames however many messages (each
frame costs a send and a receive call). No pickle anywhere.

The messages themselves are defined in common/protocol.py; each registers its kind here
(`register`) when its class is made, and the decoder builds them by kind.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from typing import TYPE_CHECKING, Any

import msgpack

if TYPE_CHECKING:
    from common.protocol import Message

PROTOCOL_VERSION = 2  # 2: a multipart message is a batch of messages
MAX_PAYLOAD_BYTES = 64 * 2**20  # a 64 MiB control message (or batch) is a bug or an attack
MAX_BATCH = 1024  # messages in one batch


class ProtocolError(ValueError):
    """A frame that is not a valid message; the text says what was wrong."""


_REGISTRY: dict[int, type[Message]] = {}


def register(cls: type[Message]) -> None:
    """Make `cls` the message of kind `cls.KIND` (each kind once)."""
    if cls.KIND in _REGISTRY:
        raise TypeError(f"message kind {cls.KIND} used twice")
    _REGISTRY[cls.KIND] = cls


def registered() -> tuple[type[Message], ...]:
    """Every message class, in the order they were registered."""
    return tuple(_REGISTRY.values())


def kind_name(kind: int) -> str:
    cls = _REGISTRY.get(kind)
    return cls.__name__ if cls else f"kind {kind}"


def pack(msg: Message) -> bytes:
    """The msgpack map of `msg`. A message's `__dict__` is exactly its fields (no slots, no
    extra attributes: tests/unit/test_protocol.py checks), so it is packed as it is."""
    return msgpack.packb(msg.__dict__, use_bin_type=True)


def encode(msg: Message) -> list[bytes]:
    return [bytes((PROTOCOL_VERSION, msg.KIND)), pack(msg)]


def batch_frames(kinds: bytes | bytearray, payloads: list[bytes]) -> list[bytes]:
    """The two frames of one batch of packed messages (at most MAX_BATCH of them and
    MAX_PAYLOAD_BYTES in all)."""
    return [bytes((PROTOCOL_VERSION,)) + kinds, payloads[0] if len(payloads) == 1
            else b"".join(payloads)]


def encode_batch(msgs: list[Message]) -> list[bytes]:
    return batch_frames(bytes(m.KIND for m in msgs), [pack(m) for m in msgs])


def decode(frames: list[bytes]) -> Message:
    """The one message in `[header, payload]`, or ProtocolError saying what is wrong."""
    out = decode_batch(frames)
    if len(out) != 1:
        raise ProtocolError(f"expected one message, got a batch of {len(out)}")
    if isinstance(out[0], ProtocolError):
        raise out[0]
    return out[0]


def decode_batch(frames: list[bytes]) -> list[Message | ProtocolError]:
    """The messages of one batch, in order. Frames that do not split into the messages the
    header names raise ProtocolError; a map that is not a valid message is a ProtocolError
    in its place, so it costs only itself."""
    if len(frames) != 2:
        raise ProtocolError(f"expected 2 frames (header, body), got {len(frames)}")
    header, body = frames
    if len(header) < 2:
        raise ProtocolError(f"header must be 1 version byte + 1 kind byte per message, got "
                            f"{len(header)} byte(s)")
    if header[0] != PROTOCOL_VERSION:
        raise ProtocolError(f"protocol version {header[0]}; this build speaks {PROTOCOL_VERSION}")
    num_msgs = len(header) - 1
    if num_msgs > MAX_BATCH:
        raise ProtocolError(f"a batch of {num_msgs} messages; the limit is {MAX_BATCH}")
    if len(body) > MAX_PAYLOAD_BYTES:
        raise ProtocolError(f"payload of {len(body)} bytes; the limit is {MAX_PAYLOAD_BYTES}")
    if num_msgs == 1:
        try:
            return [_build(header[1], msgpack.unpackb(body, raw=False, strict_map_key=True))]
        except ProtocolError as e:
            return [e]
        except Exception as e:  # msgpack raises several types
            raise ProtocolError(f"payload is not valid msgpack: {e}") from e
    maps = _split(body, num_msgs)
    out: list[Message | ProtocolError] = []
    for i in range(num_msgs):
        try:
            out.append(_build(header[i + 1], maps[i]))
        except ProtocolError as e:
            out.append(ProtocolError(f"message {i + 1} of {num_msgs}: {e}"))
    return out


def _split(body: bytes, num_msgs: int) -> list[Any]:
    """The `num_msgs` msgpack objects in `body`, or ProtocolError."""
    unpacker = msgpack.Unpacker(raw=False, strict_map_key=True,
                                max_buffer_size=max(len(body), 1))
    unpacker.feed(body)
    out = []
    try:
        for _ in range(num_msgs):
            out.append(unpacker.unpack())
    except msgpack.OutOfData:
        raise ProtocolError(f"the header names {num_msgs} messages but the body holds "
                            f"{len(out)}") from None
    except Exception as e:
        raise ProtocolError(f"body is not valid msgpack after {len(out)} message(s): {e}"
                            ) from e
    if unpacker.tell() != len(body):
        raise ProtocolError(f"the body holds more than the {num_msgs} messages the header "
                            "names")
    return out


def _build(kind: int, data: Any) -> Message:
    cls = _REGISTRY.get(kind)
    if cls is None and not _REGISTRY:  # the codec alone was imported: load the messages
        import common.protocol  # noqa: F401

        cls = _REGISTRY.get(kind)
    if cls is None:
        raise ProtocolError(f"unknown message kind {kind}")
    if not isinstance(data, dict):
        raise ProtocolError(f"{cls.__name__} payload must be a map, got {type(data).__name__}")
    allowed = _field_types(cls)
    for name, value in data.items():
        ok = allowed.get(name)
        if ok is None or type(value) not in ok:
            raise _field_error(cls, data, name, value, ok)
    return cls(**data)


_FIELD_TYPES: dict[type, dict[str, frozenset[type]]] = {}


def _field_types(cls: type[Message]) -> dict[str, frozenset[type]]:
    """Allowed types per field, resolved once per class (type hints are slow). Exact types:
    msgpack decodes to exact built-ins, and `type(v) in allowed` keeps a bool out of an int
    field in one look-up."""
    types_ = _FIELD_TYPES.get(cls)
    if types_ is None:
        hints = typing.get_type_hints(cls)
        types_ = _FIELD_TYPES[cls] = {f.name: frozenset(_allowed(hints[f.name]))
                                      for f in dataclasses.fields(cls)}
    return types_


def _field_error(cls: type[Message], data: dict, name: str, value: Any,
                 ok: frozenset[type] | None) -> ProtocolError:
    if ok is None:
        unknown = sorted(set(data) - set(_field_types(cls)))
        return ProtocolError(f"{cls.__name__} has no field(s) {unknown}")
    names = " or ".join(sorted(t.__name__ for t in ok))
    return ProtocolError(f"{cls.__name__}.{name} must be {names}, got {type(value).__name__}")


def _allowed(tp: Any) -> tuple[type, ...]:
    if isinstance(tp, types.UnionType) or typing.get_origin(tp) is typing.Union:
        return tuple(t for arg in typing.get_args(tp) for t in _allowed(arg))
    if tp is type(None):
        return (type(None),)
    origin = typing.get_origin(tp) or tp
    if origin is float:
        return (float, int)
    return (origin,)
