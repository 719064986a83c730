"""Incremental detokenization and stop-string cuts, with the embedded model's byte-level BPE
tokenizer (it splits emoji and most CJK characters over several tokens)."""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

import pytest

from services.gateway.detokenizer import CompletionText, IncrementalDetokenizer, StopCutter

TEXTS = [
    "Hello, world! 😀 中文 ok",
    "🧑‍🚀 rocket 🚀🚀 and 日本語のテキスト, ça va? naïve café",
    "   leading spaces\n\ttabs\n\nand 🎉 at the end 🎉",
    "¿Qué tal? Ελληνικά русский 한국어 👍🏽",
]


@pytest.fixture(scope="module")
def tokenizer(tiny_model) -> Any:
    from transformers import AutoTokenizer

    model_dir: Path = tiny_model("tiny-qwen3")
    return AutoTokenizer.from_pretrained(str(model_dir))


def full_decode(tokenizer: Any, ids: list[int]) -> str:
    return tokenizer.decode(ids, skip_special_tokens=True, clean_up_tokenization_spaces=False)


def run(tokenizer: Any, chunks: list[list[int]]) -> list[str]:
    detok = IncrementalDetokenizer(tokenizer)
    pieces = [detok.add(c) for c in chunks]
    pieces.append(detok.flush())
    return pieces


@pytest.mark.parametrize("text", TEXTS)
def test_one_token_at_a_time_never_emits_half_a_character(tokenizer, text) -> None:
    ids = tokenizer.encode(text, add_special_tokens=False)
    multi_token_chars = [c for c in text if len(tokenizer.encode(c, add_special_tokens=False)) > 1]
    assert multi_token_chars, "the text should split some character over tokens"
    pieces = run(tokenizer, [[t] for t in ids])
    assert all("\ufffd" not in p for p in pieces)
    assert "".join(pieces) == full_decode(tokenizer, ids) == text


def test_random_chunks_join_to_the_full_decode(tokenizer) -> None:
    rng = random.Random(0)
    for text in TEXTS:
        ids = tokenizer.encode(text, add_special_tokens=False)
        for _ in range(20):
            chunks, i = [], 0
            while i < len(ids):
                k = rng.randint(1, 4)
                chunks.append(ids[i : i + k])
                i += k
            pieces = run(tokenizer, chunks)
            assert all("\ufffd" not in p for p in pieces)
            assert "".join(pieces) == text


def test_special_tokens_are_skipped(tokenizer) -> None:
    ids = tokenizer.encode("a 😀 b", add_special_tokens=False)
    special = tokenizer.eos_token_id
    stream = [ids[0], special, *ids[1:3], special, *ids[3:], special]
    pieces = run(tokenizer, [[t] for t in stream])
    assert "".join(pieces) == "a 😀 b"
    assert all("\ufffd" not in p for p in pieces)


def test_unfinished_character_is_held_until_flush(tokenizer) -> None:
    emoji = tokenizer.encode("😀", add_special_tokens=False)
    assert len(emoji) > 1
    detok = IncrementalDetokenizer(tokenizer)
    assert detok.add(tokenizer.encode("x", add_special_tokens=False)) == "x"
    assert detok.add(emoji[:1]) == ""
    tail = detok.flush()  # the completion ended mid-character: what a full decode shows
    assert "x" + tail == full_decode(tokenizer, tokenizer.encode("x") + emoji[:1])
    assert detok.flush() == ""


def feed_all(cutter: StopCutter, pieces: list[str]) -> list[str]:
    out = [cutter.feed(p) for p in pieces]
    out.append(cutter.feed("", final=True))
    return out


def test_stop_cut_across_pieces_and_never_shown() -> None:
    out = feed_all(StopCutter(["world"]), ["Hello, wo", "r", "ld! more", " text"])
    assert out == ["Hello, ", "", "", "", ""]


def test_partial_stop_that_does_not_complete_is_released() -> None:
    out = feed_all(StopCutter(["world"]), ["a wo", "w", " ok", "wor"])
    assert "".join(out) == "a wow okwor"
    assert out[0] == "a " and out[-1] == "wor"


def test_earliest_stop_wins_and_no_stop_passes_through() -> None:
    assert feed_all(StopCutter(["c", "ab"]), ["xxabc"]) == ["xx", ""]
    assert feed_all(StopCutter([]), ["a", "b"]) == ["a", "b", ""]


def test_completion_text_cuts_at_a_multibyte_stop(tokenizer) -> None:
    ids = tokenizer.encode("Hi 😀 there 中文", add_special_tokens=False)
    cases = [(["😀"], "Hi "), (["中"], "Hi 😀 there "), (["nowhere"], "Hi 😀 there 中文")]
    for stop, want in cases:
        text = CompletionText(tokenizer, stop)
        pieces = [text.add([t], final=k == len(ids) - 1) for k, t in enumerate(ids)]
        assert "".join(pieces) == want
        assert all("\ufffd" not in p for p in pieces)


def test_invalid_bytes_are_held_only_until_a_valid_character(tokenizer) -> None:
    """Bytes that never form a character come out as U+FFFD once text follows them, exactly
    as a full decode shows them."""
    lead = tokenizer.encode("😀", add_special_tokens=False)[0]  # a lone UTF-8 lead byte
    ok = tokenizer.encode(" ok", add_special_tokens=False)
    ids = [lead] * 5 + ok
    pieces = run(tokenizer, [[t] for t in ids])
    assert pieces[:5] == [""] * 5 and pieces[5] != ""
    assert "".join(pieces) == full_decode(tokenizer, ids)


def test_the_rust_backend_decodes_as_the_tokenizer_does(tokenizer) -> None:
    """The detokenizer skips transformers' wrapper where it adds nothing: same text, on
    random ids (special tokens among them)."""
    detok = IncrementalDetokenizer(tokenizer)
    assert detok.backend is not None  # the test tokenizer is a fast one
    rng = random.Random(7)
    specials = list(tokenizer.all_special_ids)
    for _ in range(200):
        ids = [rng.randrange(len(tokenizer)) for _ in range(rng.randrange(1, 12))]
        ids.insert(rng.randrange(len(ids) + 1), rng.choice(specials))
        assert detok.decode(ids) == full_decode(tokenizer, ids)
    assert detok.decode([]) == ""


def test_a_tokenizer_without_a_backend_is_used_as_it_is() -> None:
    class Plain:
        def decode(self, ids, skip_special_tokens, clean_up_tokenization_spaces):
            return "".join(chr(97 + i) for i in ids)

    detok = IncrementalDetokenizer(Plain())
    assert detok.backend is None
    assert detok.add([0, 1]) == "ab" and detok.add([2]) == "c"
