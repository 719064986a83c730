"""Where a request runs: collocated on one worker, or prefill on P + decode on D over T.

`RulePolicy` implements the three strategies with a documented rule; the fitted cost model
(its own issue) will be another `Policy` with the same `decide`.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Protocol

from common.protocol import Heartbeat

ADAPTIVE_MIN_PROMPT_TOKENS = 64


@dataclass
class WorkerView:
    """The router's live picture of one worker, fed by heartbeats."""

    beat: Heartbeat
    last_seen: float = field(default_factory=time.monotonic)
    inflight: int = 0  # requests routed here and not finished (router-side count)

    @property
    def name(self) -> str:
        return self.beat.worker

    @property
    def load(self) -> int:
        return max(self.inflight, self.beat.num_running + self.beat.num_waiting)

    def free_tokens(self) -> int:
        return self.beat.num_free_blocks * self.beat.block_size


@dataclass
class Decision:
    route: str  # collocated | disaggregated
    worker: str = ""  # collocated
    prefill: str = ""
    decode: str = ""
    transport: str = ""
    reason: str = ""


class Policy(Protocol):
    def decide(self, num_tokens: int, n: int, route: str, workers: list[WorkerView],
               exclude_decode: set[str] = ...) -> Decision | str:
        """A decision, or a string saying why none is possible."""
        ...


def pick_transport(p: WorkerView, d: WorkerView) -> str:
    both_gpu = p.beat.device.startswith("cuda") and d.beat.device.startswith("cuda")
    if both_gpu and "cuda_ipc" in p.beat.transports and "cuda_ipc" in d.beat.transports:
        return "cuda_ipc"
    return "shm_ring"


class RulePolicy:
    """collocated: least-loaded collocated worker (any worker if there is none).
    disaggregated: least-loaded prefill worker + the decode worker with the most free KV.
    adaptive: disaggregated when a pair exists, n == 1 and the prompt has at least
    ADAPTIVE_MIN_PROMPT_TOKENS tokens (long prefills are what interfere with decodes; short
    ones do not pay for a transfer) or when there is no collocated worker; else collocated.
    A request's own `route` (collocated | disaggregated) overrides the strategy; n > 1
    always runs collocated (the fork shares the prompt's blocks on one worker)."""

    def __init__(self, strategy: str):
        self.strategy = strategy

    def decide(self, num_tokens: int, n: int, route: str, workers: list[WorkerView],
               exclude_decode: set[str] | None = None) -> Decision | str:
        exclude_decode = exclude_decode or set()
        by_role = {r: [w for w in workers if w.beat.role == r]
                   for r in ("collocated", "prefill", "decode")}
        decodes = [w for w in by_role["decode"]
                   if w.name not in exclude_decode and w.free_tokens() > num_tokens]
        pair_ok = bool(by_role["prefill"] and decodes)
        want = route if route != "auto" else self.strategy
        if want == "adaptive":
            long_prompt = num_tokens >= ADAPTIVE_MIN_PROMPT_TOKENS
            want = ("disaggregated" if pair_ok and n == 1
                    and (long_prompt or not by_role["collocated"]) else "collocated")
        if want == "disaggregated" and n > 1:
            if route == "disaggregated":
                return "n > 1 runs collocated only; drop route=disaggregated or use n = 1"
            want = "collocated"
        if want == "disaggregated" and not pair_ok:
            if route == "disaggregated":
                return ("no prefill/decode pair can take it now "
                        f"(prefill workers: {len(by_role['prefill'])}, decode workers with "
                        f"{num_tokens} free KV slots: {len(decodes)})")
            want = "collocated"
        if want == "disaggregated":
            p = min(by_role["prefill"], key=lambda w: w.load)
            d = max(decodes, key=lambda w: (w.free_tokens(), -w.load))
            return Decision("disaggregated", prefill=p.name, decode=d.name,
                            transport=pick_transport(p, d), reason=f"{want} via {self.strategy}")
        pool = by_role["collocated"] or workers
        if not pool:
            return "no healthy worker"
        w = min(pool, key=lambda w: w.load)
        return Decision("collocated", worker=w.name, reason=f"collocated via {self.strategy}")
