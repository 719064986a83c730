"""Continuous batching with chunked prefill and preemption by recompute.

Each step takes, in arrival order, every running sequence (a decode token, or the next
chunk of a prompt still being prefilled), then admits waiting sequences while the token
budget (`max_num_batched_tokens`) and the sequence budget (`max_num_seqs`) last. Decode
tokens are reserved first, so prefill chunks only fill what decodes leave. When blocks
run out for a running sequence, the latest-arrived running sequence is preempted: its
blocks are freed and it goes back to the front of the queue, to be recomputed later.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass

from services.worker.engine.block_manager import BlockManager
from services.worker.engine.sequence import Sequence, SequenceStatus


@dataclass
class ScheduledSeq:
    seq: Sequence
    num_new_tokens: int

    @property
    def completes_prompt(self) -> bool:
        """After this step, every known token has KV: the step yields a new token."""
        return self.seq.num_computed_tokens + self.num_new_tokens == self.seq.num_tokens


class Scheduler:
    def __init__(self, block_manager: BlockManager, max_num_batched_tokens: int, max_num_seqs: int):
        self.blocks = block_manager
        self.max_num_batched_tokens = max_num_batched_tokens
        self.max_num_seqs = max_num_seqs
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []  # in arrival order
        self.num_preemptions = 0
        self.peak_num_scheduled = 0  # most sequences in one step so far

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    def add_running(self, seq: Sequence, after: Sequence | None) -> None:
        """A sequence that holds its blocks already joins the batch: a forked child right
        after its parent, a sequence whose KV arrived from a peer (`after=None`) last."""
        seq.status = SequenceStatus.RUNNING
        pos = self.running.index(after) + 1 if after is not None else len(self.running)
        self.running.insert(pos, seq)

    @property
    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def remove(self, seq: Sequence) -> None:
        """Drop a finished or aborted sequence and give back its blocks."""
        if seq in self.running:
            self.running.remove(seq)
        elif seq in self.waiting:
            self.waiting.remove(seq)
        self.blocks.free(seq)

    def _preempt(self, seq: Sequence) -> None:
        self.running.remove(seq)
        self.blocks.free(seq)
        seq.status = SequenceStatus.WAITING
        self.waiting.appendleft(seq)
        self.num_preemptions += 1

    def schedule(self) -> list[ScheduledSeq]:
        budget, slots = self.max_num_batched_tokens, self.max_num_seqs
        out: list[ScheduledSeq] = []
        num_decodes = sum(1 for s in self.running[:slots] if s.num_uncomputed_tokens == 1)
        i, preempted = 0, False
        while i < len(self.running) and slots > 0 and budget > 0:
            seq = self.running[i]
            decoding = seq.num_uncomputed_tokens == 1
            num_decodes -= decoding
            n = 1 if decoding else min(seq.num_uncomputed_tokens, budget - num_decodes)
            if n <= 0:
                i += 1
                continue
            while not self.blocks.ensure_slots(seq, n):
                victim = self.running[-1]
                self._preempt(victim)
                preempted = True
                if victim is seq:
                    break
            if seq.status != SequenceStatus.RUNNING:
                continue  # preempted itself; it was the last running sequence
            out.append(ScheduledSeq(seq, n))
            budget -= n
            slots -= 1
            i += 1
        # no admissions in a step that had to preempt: memory is short
        while self.waiting and slots > 0 and budget > 0 and not preempted:
            if len(self.running) >= self.max_num_seqs:
                break
            seq = self.waiting[0]
            if not seq.block_table:
                self.blocks.acquire_prefix(seq)
            n = min(seq.num_uncomputed_tokens, budget)
            if not self.blocks.ensure_slots(seq, n):
                self.blocks.free(seq)
                seq.num_cached_tokens = 0
                break
            self.waiting.popleft()
            self.blocks.record_prefix_lookup(seq.num_tokens, seq.num_cached_tokens)
            seq.status = SequenceStatus.RUNNING
            self.running.append(seq)
            out.append(ScheduledSeq(seq, n))
            budget -= n
            slots -= 1
        self.peak_num_scheduled = max(self.peak_num_scheduled, len(out))
        return out
