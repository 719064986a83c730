"""Every message that crosses a socket, defined once, grouped by the process that receives
it. How they are encoded (msgpack maps in versioned batches) is common/codec.py; its names
are re-exported here, so `from common.protocol import encode, decode_batch` keeps working.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar

from common.codec import (  # noqa: F401  (re-exported: the codec's names, as before the split)
    MAX_BATCH,
    MAX_PAYLOAD_BYTES,
    PROTOCOL_VERSION,
    ProtocolError,
    batch_frames,
    decode,
    decode_batch,
    encode,
    encode_batch,
    kind_name,
    pack,
    register,
    registered,
)


@dataclass
class Message:
    KIND: ClassVar[int] = 0

    def __init_subclass__(cls, **kw: Any) -> None:
        super().__init_subclass__(**kw)
        register(cls)


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


ALL_MESSAGES: tuple[type[Message], ...] = registered()
