"""When a sequence ends: EOS, stop tokens, stop strings, max_tokens, max_model_len."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from services.worker.engine.sequence import Sequence

log = logging.getLogger(__name__)

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")


def load_tokenizer(model_dir: str | Path) -> Any | None:
    """The folder's HF tokenizer, or None if it has none (the engine then works on ids)."""
    if not any((Path(model_dir) / f).is_file() for f in TOKENIZER_FILES):
        return None
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(model_dir))


class StopChecker:
    def __init__(self, tokenizer: Any | None, eos_ids: tuple[int, ...], max_model_len: int):
        self.tokenizer = tokenizer
        self.eos_ids = frozenset(eos_ids)
        self.max_model_len = max_model_len

    def check(self, seq: Sequence) -> str | None:
        """Finish reason after `seq`'s newest token, or None to go on."""
        p = seq.params
        n_out = seq.num_output_tokens
        if n_out >= p.min_tokens:
            tok = seq.token_ids[-1]
            if (tok in self.eos_ids and not p.ignore_eos) or tok in p.stop_token_ids:
                return "stop"
            if p.stop and self._stop_string(seq):
                return "stop"
        if n_out >= p.max_tokens or seq.num_tokens >= self.max_model_len:
            return "length"
        return None

    def _stop_string(self, seq: Sequence) -> bool:
        """Looks for a stop string that ends inside the newest token's text."""
        ids = seq.output_token_ids
        text = self.decode(ids)
        prev_len = len(self.decode(ids[:-1])) if len(ids) > 1 else 0
        longest = max(len(s) for s in seq.params.stop)
        start = max(0, prev_len - longest + 1)
        hits = [i for s in seq.params.stop if (i := text.find(s, start)) >= 0]
        if hits:
            seq.stop_text_len = min(hits)
            return True
        return False

    def decode(self, ids: list[int]) -> str:
        if self.tokenizer is None:
            return ""
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    def output_text(self, seq: Sequence) -> str:
        text = self.decode(seq.output_token_ids)
        return text[: seq.stop_text_len] if seq.stop_text_len is not None else text
