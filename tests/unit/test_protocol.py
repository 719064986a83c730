"""Every message round-trips, alone and in batches; bad frames are refused with a clear
reason."""

from __future__ import annotations

import dataclasses
import typing

import msgpack
import pytest

from common.protocol import (
    ALL_MESSAGES,
    MAX_BATCH,
    MAX_PAYLOAD_BYTES,
    PROTOCOL_VERSION,
    Abort,
    KvChunk,
    KvReady,
    ProtocolError,
    Submit,
    TokenDelta,
    decode,
    decode_batch,
    encode,
    encode_batch,
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
        ([b"\x01", b""], "header must be 1 version byte"),
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


# ---- batches: [version + N kinds, N msgpack maps back to back]
def _header(*kinds: int) -> bytes:
    return bytes((PROTOCOL_VERSION, *kinds))


def test_a_batch_round_trips_in_order():
    msgs = [_example(cls) for cls in ALL_MESSAGES]
    frames = encode_batch(msgs)
    assert len(frames) == 2 and frames[0] == _header(*(m.KIND for m in msgs))
    assert decode_batch(frames) == msgs
    assert decode_batch(encode(msgs[0])) == [msgs[0]]  # one message is a batch of one
    assert encode_batch(msgs[:1]) == encode(msgs[0])


def test_a_bad_message_in_a_batch_costs_only_itself():
    body = b"".join([msgpack.packb({"prompt": "a"}), msgpack.packb({"stream": "yes"}),
                     msgpack.packb([1]), msgpack.packb({"prompt": "c"})])
    first, bad, not_a_map, last = decode_batch([_header(*[Submit.KIND] * 4), body])
    assert first == Submit(prompt="a") and last == Submit(prompt="c")
    assert isinstance(bad, ProtocolError)
    assert "message 2 of 4" in str(bad) and "Submit.stream must be bool" in str(bad)
    assert isinstance(not_a_map, ProtocolError) and "must be a map" in str(not_a_map)


def test_an_unknown_kind_in_a_batch_costs_only_itself():
    body = msgpack.packb({"rid": "a"}) + msgpack.packb({"rid": "b"})
    unknown, ok = decode_batch([_header(250, Abort.KIND), body])
    assert isinstance(unknown, ProtocolError) and "unknown message kind 250" in str(unknown)
    assert ok == Abort(rid="b")


@pytest.mark.parametrize(
    "frames, reason",
    [
        ([], "expected 2 frames"),
        ([_header(Abort.KIND), b"\x80", b"\x80"], "expected 2 frames"),
        ([bytes((PROTOCOL_VERSION,)), b""], "header must be"),
        ([_header(Abort.KIND, Abort.KIND), msgpack.packb({})], "names 2 messages but the body"),
        ([_header(Abort.KIND, Abort.KIND), msgpack.packb({}) * 3], "more than the 2 messages"),
        ([_header(Abort.KIND, Abort.KIND), msgpack.packb({}) + b"\xc1"], "not valid msgpack"),
        ([_header(Abort.KIND), msgpack.packb({}) * 2], "not valid msgpack"),
        ([bytes((PROTOCOL_VERSION + 1, Abort.KIND, Abort.KIND)), b""], "protocol version"),
        ([_header(*[Abort.KIND] * (MAX_BATCH + 1)), msgpack.packb({}) * (MAX_BATCH + 1)],
         "limit is"),
        ([_header(Abort.KIND, Abort.KIND), b"\x00" * (MAX_PAYLOAD_BYTES + 1)], "limit is"),
    ],
)
def test_malformed_batches_are_refused_whole(frames, reason):
    with pytest.raises(ProtocolError, match=reason):
        decode_batch(frames)


def test_decode_takes_exactly_one_message():
    with pytest.raises(ProtocolError, match="expected one message, got a batch of 2"):
        decode(encode_batch([Abort(rid="a"), Abort(rid="b")]))


@pytest.mark.parametrize("cls", ALL_MESSAGES, ids=lambda c: c.__name__)
def test_a_message_dict_is_exactly_its_fields(cls):
    """`pack` sends `__dict__` as it is: an extra attribute would go on the wire."""
    assert list(vars(_example(cls))) == [f.name for f in dataclasses.fields(cls)]


def test_the_codec_is_common_codec_and_protocol_re_exports_it():
    from common import codec, protocol

    for name in ("encode", "encode_batch", "decode", "decode_batch", "pack", "ProtocolError",
                 "PROTOCOL_VERSION", "MAX_BATCH", "MAX_PAYLOAD_BYTES", "kind_name"):
        assert getattr(protocol, name) is getattr(codec, name)
    assert codec.registered() == ALL_MESSAGES and codec.kind_name(Submit.KIND) == "Submit"
