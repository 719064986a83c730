"""What the gateway keeps per request: its client, its deadline and the text of each completion."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from common.protocol import Message, TokenDelta, Tokens
from services.gateway.detokenizer import CompletionText
from services.worker.engine.sampling_params import SamplingParams

Sink = Callable[[Message], None]
"""Where a request's replies go: a ZMQ client's identity, or an HTTP handler's queue."""


@dataclass
class Completion:
    text: CompletionText
    token_ids: list[int] = field(default_factory=list)
    pieces: list[str] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    finish_reason: str | None = None

    def delta(self, rid: str, index: int, with_logprobs: bool) -> TokenDelta:
        """Everything so far in one delta (a non-streaming client's only one)."""
        return TokenDelta(
            rid=rid, index=index, token_ids=list(self.token_ids), text="".join(self.pieces),
            finish_reason=self.finish_reason,
            logprobs=list(self.logprobs) if with_logprobs else None,
        )


class Request:
    def __init__(self, rid: str, client_tag: str, sink: Sink, stream: bool,
                 num_prompt_tokens: int, params: SamplingParams, tokenizer: Any,
                 deadline: float, client: bytes = b""):
        self.rid = rid
        self.client_tag = client_tag
        self.sink = sink
        self.stream = stream
        self.num_prompt_tokens = num_prompt_tokens
        self.params = params
        self.deadline = deadline
        self.client = client
        self.completions = [Completion(CompletionText(tokenizer, params.stop))
                            for _ in range(params.n)]

    @property
    def finished(self) -> bool:
        return all(c.finish_reason is not None for c in self.completions)

    @property
    def num_output_tokens(self) -> int:
        return sum(len(c.token_ids) for c in self.completions)

    def on_tokens(self, msg: Tokens) -> list[TokenDelta]:
        """The deltas `msg` makes ready for the client (none while a non-streaming request
        still has unfinished completions)."""
        if not 0 <= msg.index < len(self.completions):
            return []
        c = self.completions[msg.index]
        if c.finish_reason is not None:
            return []
        final = msg.finish_reason is not None
        piece = c.text.add(list(msg.token_ids), final)
        c.token_ids.extend(msg.token_ids)
        c.pieces.append(piece)
        if msg.logprobs:
            c.logprobs.extend(msg.logprobs)
        c.finish_reason = msg.finish_reason
        if self.stream:
            logprobs = list(msg.logprobs) if self.params.logprobs and msg.logprobs else None
            return [TokenDelta(rid=self.rid, index=msg.index, token_ids=list(msg.token_ids),
                               text=piece, finish_reason=msg.finish_reason, logprobs=logprobs)]
        if self.finished:
            return self.final_deltas()
        return []

    def final_deltas(self) -> list[TokenDelta]:
        return [c.delta(self.rid, i, self.params.logprobs) for i, c in enumerate(self.completions)]

    def abort(self, reason: str = "abort") -> list[TokenDelta]:
        """Ends every open completion with `reason`; the deltas that tell the client."""
        open_indices = [i for i, c in enumerate(self.completions) if c.finish_reason is None]
        for i in open_indices:
            self.completions[i].finish_reason = reason
        if not self.stream:
            return self.final_deltas()
        return [TokenDelta(rid=self.rid, index=i, finish_reason=reason) for i in open_indices]
