"""HF transformers as the reference: greedy tokens from the same folder, fp32."""

from __future__ import annotations

import functools
from pathlib import Path

import torch


@functools.lru_cache(maxsize=8)
def hf_model(path: str):
    from transformers import AutoModelForCausalLM

    try:
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    except TypeError:
        model = AutoModelForCausalLM.from_pretrained(path, torch_dtype=torch.float32)
    return model.eval()


@torch.inference_mode()
def hf_greedy(path: str | Path, prompt: list[int], num_tokens: int) -> list[int]:
    """Plain argmax decoding with HF's KV cache; no EOS handling (like ignore_eos)."""
    model = hf_model(str(path))
    out = model(torch.tensor([prompt]), use_cache=True)
    tokens: list[int] = []
    for _ in range(num_tokens):
        tok = int(out.logits[0, -1].argmax())
        tokens.append(tok)
        out = model(torch.tensor([[tok]]), past_key_values=out.past_key_values, use_cache=True)
    return tokens
