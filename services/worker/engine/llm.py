"""Offline API in the shape vLLM users know: `LLM(...).generate(prompts, SamplingParams(...))`."""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from typing import Any

from services.worker.engine.config import EngineConfig
from services.worker.engine.engine import LLMEngine
from services.worker.engine.sampling_params import SamplingParams


@dataclass
class CompletionOutput:
    index: int
    token_ids: list[int]
    text: str
    finish_reason: str | None
    logprobs: list[float] | None = None


@dataclass
class RequestOutput:
    rid: str
    prompt: str | None
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput] = field(default_factory=list)
    num_cached_tokens: int = 0

    @property
    def token_ids(self) -> list[int]:
        return self.outputs[0].token_ids

    @property
    def text(self) -> str:
        return self.outputs[0].text


class LLM:
    def __init__(self, model: str | None = None, device: str = "cpu", **kwargs: Any):
        self.engine = LLMEngine(EngineConfig(model=model, device=device, **kwargs))
        self.tokenizer = self.engine.tokenizer
        self._ids = itertools.count()

    def encode(self, prompt: str | list[int]) -> list[int]:
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise ValueError("this model folder has no tokenizer; pass token id lists")
            return self.tokenizer.encode(prompt, add_special_tokens=True)
        return [int(t) for t in prompt]

    def chat_prompt(self, message: str) -> list[int]:
        """Token ids of one user message through the model's chat template."""
        if self.tokenizer is None or not getattr(self.tokenizer, "chat_template", None):
            raise ValueError("this model has no chat template")
        out = self.tokenizer.apply_chat_template(
            [{"role": "user", "content": message}], add_generation_prompt=True, tokenize=True
        )
        return list(out["input_ids"] if isinstance(out, dict) or hasattr(out, "keys") else out)

    def generate(
        self,
        prompts: str | list[int] | list[str | list[int]],
        sampling_params: SamplingParams | list[SamplingParams] | None = None,
    ) -> list[RequestOutput]:
        """Run every prompt to completion; outputs come back in prompt order."""
        if isinstance(prompts, str) or (prompts and isinstance(prompts[0], int)):
            prompts = [prompts]  # type: ignore[list-item]
        params = sampling_params or SamplingParams()
        per_prompt = params if isinstance(params, list) else [params] * len(prompts)
        if len(per_prompt) != len(prompts):
            raise ValueError(
                f"{len(per_prompt)} sampling params for {len(prompts)} prompts; "
                "give one, or one per prompt"
            )
        rids: list[str] = []
        try:
            for prompt, p in zip(prompts, per_prompt, strict=True):
                rid = f"offline-{next(self._ids)}"
                self.engine.add_request(rid, self.encode(prompt), p)
                rids.append(rid)
        except Exception:  # one bad prompt fails the call; none of it stays queued
            for rid in rids:
                self.engine.abort(rid)
            raise
        eng = self.engine
        while eng.has_unfinished():
            eng.step()
        results = []
        for rid, prompt in zip(rids, prompts, strict=True):
            seqs = sorted(eng.pop_finished(rid), key=lambda s: s.index)
            out = RequestOutput(
                rid=rid, prompt=prompt if isinstance(prompt, str) else None,
                prompt_token_ids=seqs[0].token_ids[: seqs[0].num_prompt_tokens],
                num_cached_tokens=seqs[0].num_cached_tokens,
            )
            for s in seqs:
                out.outputs.append(CompletionOutput(
                    index=s.index, token_ids=s.output_token_ids, text=eng.stop.output_text(s),
                    finish_reason=s.finish_reason,
                    logprobs=list(s.logprobs) if s.params.logprobs else None,
                ))
            results.append(out)
        return results
