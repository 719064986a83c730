"""Text of one completion, piece by piece, as its tokens arrive.

`IncrementalDetokenizer` turns token ids into text without ever emitting half a character:
byte-level tokenizers split emoji and CJK characters over several tokens, and a decode that
ends inside such a character ends in U+FFFD. The joined pieces equal one decode of all ids.

`StopCutter` cuts the text at the first stop string and holds back a tail that might grow
into one, so a stream never shows a stop string or anything after it.
"""

from __future__ import annotations

from typing import Any

REPLACEMENT_CHAR = "\ufffd"


def rust_backend(tokenizer: Any) -> Any | None:
    """The `tokenizers.Tokenizer` under an HF fast tokenizer whose decode adds nothing to
    the backend's once cleanup is off (its `_decode` is not overridden), else None. Going
    to it directly skips transformers' argument handling: most of the cost per piece."""
    usable = _BACKEND_USABLE.get(type(tokenizer))
    if usable is None:
        try:
            from transformers.tokenization_utils_tokenizers import TokenizersBackend
        except ImportError:
            usable = False
        else:
            usable = isinstance(tokenizer, TokenizersBackend) and (
                getattr(type(tokenizer), "_decode", None) is TokenizersBackend._decode)
        _BACKEND_USABLE[type(tokenizer)] = usable
    return tokenizer.backend_tokenizer if usable else None


_BACKEND_USABLE: dict[type, bool] = {}


class IncrementalDetokenizer:
    """Decodes a short window of recent ids per step instead of the whole completion.

    `ids[prefix_offset:read_offset]` is context whose text was already emitted; decoding
    it together with the new ids and keeping only the text past the context's own decode
    gives the new piece, with the spacing the context implies.
    """

    def __init__(self, tokenizer: Any):
        self.tokenizer = tokenizer
        self.backend = rust_backend(tokenizer)
        self.ids: list[int] = []
        self.prefix_offset = 0
        self.read_offset = 0

    def decode(self, ids: list[int]) -> str:
        if not ids:
            return ""
        if self.backend is not None:
            return self.backend.decode(ids, skip_special_tokens=True)
        return self.tokenizer.decode(
            ids, skip_special_tokens=True, clean_up_tokenization_spaces=False
        )

    def add(self, token_ids: list[int]) -> str:
        """New text made complete by `token_ids`; "" while the tail is an unfinished char."""
        self.ids.extend(token_ids)
        return self._advance(final=False)

    def flush(self) -> str:
        """Whatever is held back, as it decodes now (the completion has ended)."""
        return self._advance(final=True)

    def _advance(self, final: bool) -> str:
        if self.read_offset == len(self.ids):
            return ""
        context = self.decode(self.ids[self.prefix_offset : self.read_offset])
        text = self.decode(self.ids[self.prefix_offset :])
        if not final and (len(text) <= len(context) or text.endswith(REPLACEMENT_CHAR)):
            return ""  # nothing new yet, or the newest character is still missing bytes
        self.prefix_offset, self.read_offset = self.read_offset, len(self.ids)
        return text[len(context) :]


class StopCutter:
    """Passes text through until the first stop string, which it cuts (with all after it).

    A tail of the text that is a prefix of some stop string is held back until the next
    piece shows whether the stop string completes.
    """

    def __init__(self, stop: list[str]):
        self.stop = [s for s in stop if s]
        self.pending = ""
        self.stopped = False

    def feed(self, piece: str, final: bool = False) -> str:
        """Text that is safe to emit now; after a stop string, always ""."""
        if self.stopped:
            return ""
        text = self.pending + piece
        if not self.stop:
            return text
        hits = [i for s in self.stop if (i := text.find(s)) >= 0]
        if hits:
            self.stopped = True
            self.pending = ""
            return text[: min(hits)]
        keep = 0 if final else self._partial_tail(text)
        self.pending = text[len(text) - keep :] if keep else ""
        return text[: len(text) - keep]

    def _partial_tail(self, text: str) -> int:
        """Length of the longest tail of `text` that a stop string starts with."""
        longest = min(len(text), max(len(s) for s in self.stop) - 1)
        for k in range(longest, 0, -1):
            tail = text[-k:]
            if any(s.startswith(tail) for s in self.stop):
                return k
        return 0


class CompletionText:
    """One completion's text: incremental decode, then the stop-string cut."""

    def __init__(self, tokenizer: Any, stop: list[str]):
        self.detokenizer = IncrementalDetokenizer(tokenizer)
        self.cutter = StopCutter(stop)

    def add(self, token_ids: list[int], final: bool) -> str:
        piece = self.detokenizer.add(token_ids)
        if final:
            piece += self.detokenizer.flush()
        return self.cutter.feed(piece, final)
