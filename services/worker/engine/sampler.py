"""Turn a step's logits into tokens: greedy, temperature, top-k, top-p, per-request seeds."""

from __future__ import annotations

import torch

from services.worker.engine.sequence import Sequence


def _mask_tokens(logits: torch.Tensor, seqs: list[Sequence], eos_ids: tuple[int, ...]) -> None:
    """min_tokens: a sequence may not end (EOS or a stop token) before it has that many."""
    for row, seq in enumerate(seqs):
        p = seq.params
        if seq.num_output_tokens < p.min_tokens:
            banned = list(p.stop_token_ids) + ([] if p.ignore_eos else list(eos_ids))
            if banned:
                logits[row, banned] = float("-inf")


def _top_k_top_p(logits: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor) -> torch.Tensor:
    """Mask tokens outside each row's top-k and top-p nucleus (top_k <= 0: off)."""
    sorted_logits, order = logits.sort(dim=-1, descending=True)
    vocab = logits.shape[-1]
    rank = torch.arange(vocab, device=logits.device)[None, :]
    k = torch.where(top_k > 0, top_k, vocab)[:, None]
    sorted_logits = sorted_logits.masked_fill(rank >= k, float("-inf"))
    probs = sorted_logits.softmax(dim=-1)
    before = probs.cumsum(dim=-1) - probs  # mass strictly before each token
    sorted_logits = sorted_logits.masked_fill(before >= top_p[:, None], float("-inf"))
    return torch.full_like(logits, float("-inf")).scatter(-1, order, sorted_logits)


def sample(
    logits: torch.Tensor,
    seqs: list[Sequence],
    eos_ids: tuple[int, ...],
    generator: torch.Generator | None = None,
) -> tuple[list[int], list[float] | None]:
    """One token per row of `logits` `[num_seqs, vocab]`; logprobs if any sequence asks.

    Sampling draws `argmax(probs / E)` with `E ~ Exp(1)` per token, which picks token i
    with probability `probs[i]`; a sequence with a seed draws E from its own generator,
    so its tokens do not depend on what else is in the batch.
    """
    logits = logits.float()
    _mask_tokens(logits, seqs, eos_ids)
    logprobs = None
    if any(s.params.logprobs for s in seqs):
        logprobs = logits.log_softmax(dim=-1)
    greedy = logits.argmax(dim=-1)
    rows = [i for i, s in enumerate(seqs) if not s.params.greedy]
    tokens = greedy
    if rows:
        dev = logits.device
        sub = logits[rows]
        temp = torch.tensor([seqs[i].params.temperature for i in rows], device=dev)
        top_k = torch.tensor([seqs[i].params.top_k for i in rows], device=dev)
        top_p = torch.tensor([seqs[i].params.top_p for i in rows], device=dev)
        sub = sub / temp[:, None]
        if bool((top_k > 0).any()) or bool((top_p < 1).any()):
            sub = _top_k_top_p(sub, top_k, top_p)
        probs = sub.softmax(dim=-1)
        noise = torch.empty_like(probs)
        unseeded = [j for j, i in enumerate(rows) if seqs[i].generator is None]
        if unseeded:
            noise[unseeded] = torch.empty_like(probs[unseeded]).exponential_(generator=generator)
        for j, i in enumerate(rows):
            if seqs[i].generator is not None:
                noise[j].exponential_(generator=seqs[i].generator)
        tokens = greedy.clone()
        tokens[rows] = (probs / noise.clamp_min_(1e-20)).argmax(dim=-1)
    token_list = tokens.tolist()
    lp = None
    if logprobs is not None:
        lp = logprobs.gather(1, tokens[:, None])[:, 0].tolist()
    return token_list, lp
