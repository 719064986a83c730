"""Every message round-trips; bad frames are refused with a clear reason."""

from __future__ import annotations

import dataclasses
import typing

import msgpack
import pytest

from common.protocol import (
    ALL_MESSAGES,
    MAX_PAYLOAD_BYTES,
    PROTOCOL_VERSION,
    KvChunk,
    KvReady,
    ProtocolError,
    Submit,
    TokenDelta,
    decode,
    encode,
)

SAMPLE_VALUES = {str: "x-é", int: 7, float: 0.5, bool: True, list: [1, 2, 3], dict: {"a": 1}}


def _example(cls):
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for f in dataclasses.fields(cls):
        args = typing.get_args(hints[f.name]) or (hints[f.name],)
        kind = next(typing.get_origin(a) or a for a in args if a is not type(None))
        kwargs[f.name] = SAMPLE_VALUES[kind]
    return cls(**kwargs)


@pytest.mark.parametrize("cls", ALL_MESSAGES, ids=lambda c: c.__name__)
def test_round_trip(cls):
    msg = _example(cls)
    frames = encode(msg)
    assert frames[0] == bytes((PROTOCOL_VERSION, cls.KIND))
    assert decode(frames) == msg
    assert decode(encode(cls())) == cls()


def test_kinds_are_unique():
    assert len({c.KIND for c in ALL_MESSAGES}) == len(ALL_MESSAGES)


@pytest.mark.parametrize(
    "frames, reason",
    [
        ([b"\x01\x01"], "expected 2 frames"),
        ([b"\x01", b""], "header must be 2 bytes"),
        ([bytes((PROTOCOL_VERSION + 1, 1)), msgpack.packb({})], "protocol version"),
        ([bytes((PROTOCOL_VERSION, 250)), msgpack.packb({})], "unknown message kind 250"),
        ([bytes((PROTOCOL_VERSION, Submit.KIND)), b"\xc1garbage"], "not valid msgpack"),
        ([bytes((PROTOCOL_VERSION, Submit.KIND)), msgpack.packb([1, 2])], "must be a map"),
        ([bytes((PROTOCOL_VERSION, Submit.KIND)), msgpack.packb({"nope": 1})], "no field"),
        ([bytes((PROTOCOL_VERSION, Submit.KIND)), msgpack.packb({"stream": "yes"})],
         "Submit.stream must be bool"),
        ([bytes((PROTOCOL_VERSION, TokenDelta.KIND)), msgpack.packb({"index": True})],
         "TokenDelta.index must be int"),
        ([bytes((PROTOCOL_VERSION, Submit.KIND)), b"\x00" * (MAX_PAYLOAD_BYTES + 1)], "limit"),
    ],
)
def test_bad_frames_are_refused_with_a_reason(frames, reason):
    with pytest.raises(ProtocolError, match=reason):
        decode(frames)


def test_no_pickle_on_the_wire():
    payload = encode(Submit(prompt="hi"))[1]
    assert b"pickle" not in payload and payload[:1] != b"\x80"  # pickle protocol marker


def test_kv_chunk_and_kv_ready_carry_transport_handles():
    handle = {"transport": "cuda_ipc", "rid": "r#0", "block_ids": [4, 5, 9], "number": 3,
              "export": {"storage": {"handle": b"\x00\xff" * 32, "nbytes": 1 << 40},
                         "shape": [28, 2, 4096, 16, 2, 128]}}
    chunk = KvChunk(rid="r", src_address="ipc:///tmp/p.sock", index=2, block_offset=7,
                    num_blocks=3, transport="cuda_ipc", handle=handle)
    assert decode(encode(chunk)) == chunk
    ready = KvReady(rid="r", token_ids=[1, 2, 3], num_prompt_tokens=2, transport="cuda_ipc",
                    handle=handle, block_offset=10, num_chunks=3)
    assert decode(encode(ready)) == ready


def test_kv_ready_without_the_chunk_fields_means_no_chunks():
    """A KvReady from a sender that ships no chunks (older builds) decodes as before."""
    payload = msgpack.packb({"rid": "r", "token_ids": [1, 2], "num_prompt_tokens": 1},
                            use_bin_type=True)
    msg = decode([bytes((PROTOCOL_VERSION, KvReady.KIND)), payload])
    assert msg.block_offset == 0 and msg.num_chunks == 0
    with pytest.raises(ProtocolError, match="KvChunk.num_blocks must be int"):
        decode([bytes((PROTOCOL_VERSION, KvChunk.KIND)), msgpack.packb({"num_blocks": "3"})])
