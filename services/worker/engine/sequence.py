"""One sequence: its tokens, how many of them have KV in the cache, and its blocks."""

from __future__ import annotations

import enum
from dataclasses import dataclass, field

import torch

from services.worker.engine.sampling_params import SamplingParams


class SequenceStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


@dataclass
class Sequence:
    """A prompt and its growing output.

    Invariants: `num_computed_tokens <= len(token_ids)`; KV of token positions
    `[0, num_computed_tokens)` lives in `block_table`. A sequence with
    `num_computed_tokens == len(token_ids) - 1` is decoding: one new token per step.
    """

    rid: str
    index: int  # which of the request's n completions
    token_ids: list[int]
    num_prompt_tokens: int
    params: SamplingParams
    arrival: int  # monotonically increasing admission order
    status: SequenceStatus = SequenceStatus.WAITING
    num_computed_tokens: int = 0
    num_cached_tokens: int = 0  # prompt tokens served from the prefix cache
    block_table: list[int] = field(default_factory=list)
    # the prefix cache's bookkeeping (BlockManager.commit): block_table[:committed_blocks]
    # are hashed, the last of them with committed_hash
    committed_blocks: int = 0
    committed_hash: int | None = None
    generator: torch.Generator | None = None
    logprobs: list[float] = field(default_factory=list)
    finish_reason: str | None = None
    stop_text_len: int | None = None  # set when a stop string ends the text
    forked: bool = False  # n > 1: the children have been spawned
    prefill_only: bool = False  # disaggregated prefill leg: stop after the first token

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def num_output_tokens(self) -> int:
        return len(self.token_ids) - self.num_prompt_tokens

    @property
    def output_token_ids(self) -> list[int]:
        return self.token_ids[self.num_prompt_tokens :]

    @property
    def num_uncomputed_tokens(self) -> int:
        return len(self.token_ids) - self.num_computed_tokens

    @property
    def is_finished(self) -> bool:
        return self.status == SequenceStatus.FINISHED

    @property
    def key(self) -> tuple[str, int]:
        return (self.rid, self.index)
