"""HF transformers as the reference: greedy tokens from the same folder."""

from __future__ import annotations

import functools
from pathlib import Path

import torch


@functools.lru_cache(maxsize=8)
def hf_model(path: str, dtype: torch.dtype = torch.float32, device: str = "cpu"):
    from transformers import AutoModelForCausalLM

    try:
        model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype)
    except TypeError:  # transformers 4 names it torch_dtype
        model = AutoModelForCausalLM.from_pretrained(path, torch_dtype=dtype)
    return model.to(device).eval()


@torch.inference_mode()
def hf_greedy(
    path: str | Path, prompt: list[int], num_tokens: int,
    dtype: torch.dtype = torch.float32, device: str = "cpu",
) -> list[int]:
    """Plain argmax decoding with HF's KV cache; no EOS handling (like ignore_eos)."""
    model = hf_model(str(path), dtype, device)
    out = model(torch.tensor([prompt], device=device), use_cache=True)
    tokens: list[int] = []
    for _ in range(num_tokens):
        tok = int(out.logits[0, -1].argmax())
        tokens.append(tok)
        nxt = torch.tensor([[tok]], device=device)
        out = model(nxt, past_key_values=out.past_key_values, use_cache=True)
    return tokens
