"""A stand-in engine with no model: fixed tokens, no compute, for measuring the control plane.

Selected with `model = "null"` in the mesh config. Each step gives every running request
one token (id `NULL_TOKEN`) until its `max_tokens`; it never prefills for a peer and never
reserves KV, so the router keeps such requests collocated.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from services.worker.engine.engine import RequestError, TokenEvent
from services.worker.engine.sampling_params import SamplingParams
from services.worker.engine.sequence import Sequence

NULL_TOKEN = 42


@dataclass
class _Config:
    block_size: int = 16


class _Runner:
    kv_pool = torch.zeros(1, 2, 1, 16, 1, 8)  # a token pool so transports can be built


class NullEngine:
    def __init__(self, num_blocks: int = 1 << 20):
        self.config = _Config()
        self.runner = _Runner()
        self.num_blocks = num_blocks
        self.seqs: dict[str, list[Sequence]] = {}
        self.running: dict[str, Sequence] = {}

    def add_request(self, rid: str, prompt_token_ids: list[int], params: SamplingParams,
                    prefill_only: bool = False) -> None:
        if rid in self.seqs:
            raise RequestError(f"request id {rid!r} is already in use")
        if prefill_only or params.n > 1:
            raise RequestError("the null engine runs n = 1 collocated requests only")
        seq = Sequence(rid, 0, list(prompt_token_ids), len(prompt_token_ids), params, 0)
        self.seqs[rid] = [seq]
        self.running[rid] = seq

    def step(self) -> list[TokenEvent]:
        events = []
        for rid, seq in list(self.running.items()):
            seq.token_ids.append(NULL_TOKEN)
            done = seq.num_output_tokens >= seq.params.max_tokens
            events.append(TokenEvent(rid, 0, NULL_TOKEN, None, "length" if done else None))
            if done:
                del self.running[rid]
        return events

    def abort(self, rid: str) -> bool:
        self.running.pop(rid, None)
        return self.seqs.pop(rid, None) is not None

    def has_unfinished(self) -> bool:
        return bool(self.running)

    def take_prefilled(self) -> list[Sequence]:
        return []

    def computed_blocks(self, rid: str) -> list[int]:
        return []

    def reserve(self, rid: str, num_tokens: int) -> list[int] | None:
        return None

    def add_prefilled(self, *args: object) -> None:
        raise RequestError("the null engine takes no KV hand-offs")

    def release(self, rid: str) -> bool:
        return False

    def stats(self) -> dict[str, float]:
        return {"num_free_blocks": self.num_blocks, "num_blocks": self.num_blocks,
                "num_running": len(self.running), "num_waiting": 0, "prefix_hit_rate": 0.0,
                "num_preemptions": 0, "peak_batch_seqs": 0}
