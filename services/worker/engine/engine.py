"""The engine every worker runs: requests in, one model step at a time, tokens out."""

from __future__ import annotations

import itertools
import json
import logging
from dataclasses import dataclass
from pathlib import Path

import torch

from services.worker.engine.block_manager import BlockManager
from services.worker.engine.config import EngineConfig
from services.worker.engine.runner import ModelRunner
from services.worker.engine.sampler import sample
from services.worker.engine.sampling_params import SamplingParams
from services.worker.engine.scheduler import ScheduledSeq, Scheduler
from services.worker.engine.sequence import Sequence, SequenceStatus
from services.worker.engine.stop import StopChecker, load_tokenizer

log = logging.getLogger(__name__)


class RequestError(ValueError):
    """A request the engine cannot take; the message says what and what is allowed."""


@dataclass
class TokenEvent:
    """One new token of one sequence; `finish_reason` is set on its last token."""

    rid: str
    index: int
    token_id: int
    logprob: float | None
    finish_reason: str | None


class LLMEngine:
    def __init__(self, config: EngineConfig):
        self.config = config
        if config.model is None:
            from services.worker.models.default_model import default_model_path

            model_dir = str(default_model_path())
        else:
            model_dir = config.model
            if not Path(model_dir).is_dir():
                raise FileNotFoundError(f"model folder {model_dir!r} does not exist")
        self.model_dir = model_dir
        self.runner = ModelRunner(config, model_dir)
        self.model_config = self.runner.model_cfg
        self.tokenizer = load_tokenizer(model_dir)
        self.eos_ids = self._eos_ids()
        capacity = self.runner.num_blocks * config.block_size
        self.max_model_len = config.max_model_len or min(
            self.model_config.max_position_embeddings, capacity
        )
        if self.max_model_len > capacity:
            raise ValueError(
                f"max_model_len={self.max_model_len} needs more KV slots than the pool has "
                f"({self.runner.num_blocks} blocks x {config.block_size} = {capacity})"
            )
        self.runner.capture_graphs(self.max_model_len)
        self.blocks = BlockManager(
            self.runner.num_blocks, config.block_size, config.enable_prefix_caching
        )
        self.scheduler = Scheduler(self.blocks, config.max_num_batched_tokens, config.max_num_seqs)
        self.stop = StopChecker(self.tokenizer, self.eos_ids, self.max_model_len)
        self.seqs: dict[str, list[Sequence]] = {}
        self.held: dict[str, Sequence] = {}  # prefilled, blocks kept for the KV hand-off
        self.reserved: dict[str, Sequence] = {}  # blocks waiting for a peer's KV
        self._prefilled: list[Sequence] = []
        self._arrival = itertools.count()
        self._sample_gen = torch.Generator(device=self.runner.device).manual_seed(config.seed)

    def _eos_ids(self) -> tuple[int, ...]:
        ids = set(self.model_config.eos_token_ids)
        gen = Path(self.model_dir) / "generation_config.json"
        if gen.is_file():
            eos = json.loads(gen.read_text()).get("eos_token_id")
            ids |= set(eos if isinstance(eos, list) else [eos] if eos is not None else [])
        if self.tokenizer is not None and self.tokenizer.eos_token_id is not None:
            ids.add(self.tokenizer.eos_token_id)
        return tuple(sorted(ids))

    # ---- requests
    def add_request(
        self, rid: str, prompt_token_ids: list[int], params: SamplingParams,
        prefill_only: bool = False,
    ) -> None:
        """Queue a request. `prefill_only`: compute the prompt and the first token, then hold
        the blocks for a KV hand-off (see `take_prefilled`) instead of decoding on."""
        if rid in self.seqs or rid in self.reserved:
            raise RequestError(f"request id {rid!r} is already in use")
        n = len(prompt_token_ids)
        if n == 0:
            raise RequestError("prompt is empty; give at least one token")
        if n >= self.max_model_len:
            raise RequestError(
                f"prompt has {n} tokens; max_model_len is {self.max_model_len} "
                "(prompt plus at least one new token must fit)"
            )
        vocab = self.model_config.vocab_size
        bad = next((t for t in prompt_token_ids if not 0 <= t < vocab), None)
        if bad is not None:
            raise RequestError(f"prompt token id {bad} is outside the vocabulary [0, {vocab})")
        if prefill_only and params.n > 1:
            raise RequestError("n > 1 runs collocated; a prefill-only leg takes n = 1")
        if params.stop and self.tokenizer is None:
            raise RequestError("stop strings need a tokenizer; this model folder has none")
        seq = Sequence(
            rid=rid, index=0, token_ids=list(prompt_token_ids), num_prompt_tokens=n,
            params=params, arrival=next(self._arrival), prefill_only=prefill_only,
        )
        if params.seed is not None:
            seq.generator = self._generator(params.seed, 0)
        self.seqs[rid] = [seq]
        self.scheduler.add(seq)

    # ---- KV hand-off: prefill side
    def take_prefilled(self) -> list[Sequence]:
        """Prefill-only sequences that got their first token since the last call; their
        blocks stay held until `release`."""
        out, self._prefilled = self._prefilled, []
        return out

    def computed_blocks(self, rid: str) -> list[int]:
        """A prefill-only request still computing its prompt: its blocks whose every position
        has KV, in order (these may ship before the prompt completes); [] otherwise."""
        seqs = self.seqs.get(rid)
        if not seqs or not seqs[0].prefill_only or seqs[0].status != SequenceStatus.RUNNING:
            return []
        seq = seqs[0]
        return seq.block_table[:seq.num_computed_tokens // self.config.block_size]

    def release(self, rid: str) -> bool:
        """Free a held prefill-only sequence's blocks (the peer has its KV, or gave up)."""
        seq = self.held.pop(rid, None)
        if seq is not None:
            self.blocks.free(seq)
            self.seqs.pop(rid, None)
        return seq is not None

    # ---- KV hand-off: decode side
    def reserve(self, rid: str, num_tokens: int) -> list[int] | None:
        """Blocks for `num_tokens` positions of KV that a prefill worker will write; None
        if the pool is short now."""
        if rid in self.seqs or rid in self.reserved:
            raise RequestError(f"request id {rid!r} is already in use")
        if not 0 < num_tokens < self.max_model_len:
            raise RequestError(f"cannot reserve {num_tokens} tokens; max_model_len is "
                               f"{self.max_model_len}")
        seq = Sequence(rid=rid, index=0, token_ids=[], num_prompt_tokens=num_tokens,
                       params=SamplingParams(), arrival=next(self._arrival))
        if not self.blocks.reserve(seq, num_tokens):
            return None
        self.reserved[rid] = seq
        return list(seq.block_table)

    def add_prefilled(self, rid: str, token_ids: list[int], num_prompt_tokens: int,
                      params: SamplingParams) -> None:
        """Join the running batch with the prompt's KV already in the reserved blocks and
        the first token (sampled by the prefill worker) as the last of `token_ids`."""
        seq = self.reserved.pop(rid, None)
        if seq is None:
            raise RequestError(f"no reservation for request {rid!r} (expired or aborted)")
        if len(token_ids) != num_prompt_tokens + 1 or num_prompt_tokens != seq.num_prompt_tokens:
            self.blocks.free(seq)
            raise RequestError(f"{rid}: reserved {seq.num_prompt_tokens} prompt tokens, "
                               f"got {num_prompt_tokens} and {len(token_ids)} token ids")
        seq.token_ids, seq.params = list(token_ids), params
        seq.num_computed_tokens = num_prompt_tokens
        if params.seed is not None:  # the prefill worker drew the first token's noise
            seq.generator = self._generator(params.seed, 0)
            if not params.greedy:
                vocab = self.model_config.vocab_size
                torch.empty(vocab, device=self.runner.device).exponential_(
                    generator=seq.generator)
        self.blocks.commit(seq)
        self.seqs[rid] = [seq]
        self.scheduler.add_running(seq, after=None)

    def _generator(self, seed: int, index: int) -> torch.Generator:
        mixed = (seed + index * 0x9E3779B97F4A7C15) % (2**63)
        return torch.Generator(device=self.runner.device).manual_seed(mixed)

    def abort(self, rid: str) -> bool:
        """Drop every sequence of a request and free its blocks; False if unknown."""
        seqs = self.seqs.pop(rid, None)
        for seq in seqs or []:
            if not seq.is_finished:
                self.scheduler.remove(seq)
                seq.status, seq.finish_reason = SequenceStatus.FINISHED, "abort"
        held = self.release(rid)
        reserved = self.reserved.pop(rid, None)
        if reserved is not None:
            self.blocks.free(reserved)
        self._prefilled = [s for s in self._prefilled if s.rid != rid]
        return seqs is not None or held or reserved is not None

    def has_unfinished(self) -> bool:
        return self.scheduler.has_work

    def pop_finished(self, rid: str) -> list[Sequence]:
        """The sequences of a request whose every sequence has finished (then forgotten)."""
        seqs = self.seqs[rid]
        if all(s.is_finished for s in seqs) and len(seqs) == seqs[0].params.n:
            del self.seqs[rid]
        return seqs

    # ---- one step
    def step(self) -> list[TokenEvent]:
        scheduled = self.scheduler.schedule()
        if not scheduled:
            return []
        self.runner.copy_blocks(self.blocks.take_copies())
        # decode sequences first: the attention path batches them
        scheduled.sort(key=lambda s: s.num_new_tokens != 1 or not s.completes_prompt)
        batch = []
        for s in scheduled:
            seq, start = s.seq, s.seq.num_computed_tokens
            end = start + s.num_new_tokens
            batch.append((seq.token_ids[start:end], start, end, seq.block_table))
        sample_rows = [i for i, s in enumerate(scheduled) if s.completes_prompt]
        logits = self.runner.run(batch, sample_rows)
        for s in scheduled:
            s.seq.num_computed_tokens += s.num_new_tokens
            self.blocks.commit(s.seq)
        seqs, rows = self._fork_children([scheduled[i] for i in sample_rows])
        tokens, logprobs = sample(logits[rows], seqs, self.eos_ids, self._sample_gen)
        events = []
        for k, (seq, tok) in enumerate(zip(seqs, tokens, strict=True)):
            seq.token_ids.append(tok)
            lp = logprobs[k] if logprobs is not None else None
            if lp is not None and seq.params.logprobs:
                seq.logprobs.append(lp)
            reason = self.stop.check(seq)
            if reason is not None:
                seq.status, seq.finish_reason = SequenceStatus.FINISHED, reason
                self.scheduler.remove(seq)
            elif seq.prefill_only:  # hand-off: keep the blocks, stop computing
                seq.status = SequenceStatus.FINISHED
                self.scheduler.running.remove(seq)
                self.held[seq.rid] = seq
                self._prefilled.append(seq)
            events.append(TokenEvent(seq.rid, seq.index, tok, lp, reason))
        return events

    def _fork_children(self, sampled: list[ScheduledSeq]) -> tuple[list[Sequence], list[int]]:
        """n > 1: when a prompt completes, its children share its blocks and its logits row."""
        seqs, rows = [], []
        for row, s in enumerate(sampled):
            seq = s.seq
            seqs.append(seq)
            rows.append(row)
            if seq.params.n == 1 or seq.forked:
                continue
            seq.forked = True
            prev = seq
            for k in range(1, seq.params.n):
                child = Sequence(
                    rid=seq.rid, index=k, token_ids=list(seq.token_ids),
                    num_prompt_tokens=seq.num_prompt_tokens, params=seq.params,
                    arrival=seq.arrival, forked=True,
                    num_cached_tokens=seq.num_cached_tokens,
                )
                if seq.params.seed is not None:
                    child.generator = self._generator(seq.params.seed, k)
                self.blocks.fork(seq, child)
                self.scheduler.add_running(child, after=prev)
                self.seqs[seq.rid].append(child)
                seqs.append(child)
                rows.append(row)
                prev = child
        return seqs, rows

    # ---- counters
    def stats(self) -> dict[str, float]:
        return {
            "num_free_blocks": self.blocks.num_free_blocks,
            "num_blocks": self.blocks.num_blocks,
            "prefix_hit_rate": self.blocks.prefix_hit_rate,
            "num_running": len(self.scheduler.running),
            "num_waiting": len(self.scheduler.waiting),
            "num_preemptions": self.scheduler.num_preemptions,
            "peak_batch_seqs": self.scheduler.peak_num_scheduled,
            "num_held": len(self.held),
            "num_reserved": len(self.reserved),
        }
