"""Per-request sampling parameters, validated on construction."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


class SamplingParamsError(ValueError):
    """A sampling parameter is outside its allowed range; the message names both."""


@dataclass
class SamplingParams:
    n: int = 1
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1
    min_tokens: int = 0
    max_tokens: int = 16
    stop: list[str] = field(default_factory=list)
    stop_token_ids: list[int] = field(default_factory=list)
    ignore_eos: bool = False
    seed: int | None = None
    logprobs: bool = False

    def __post_init__(self) -> None:
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        self.stop = list(self.stop or [])
        self.stop_token_ids = [int(t) for t in (self.stop_token_ids or [])]
        _check(_is_int(self.n) and self.n >= 1, "n", self.n, "an integer >= 1")
        _check(
            _is_num(self.temperature) and self.temperature >= 0,
            "temperature", self.temperature, "a number >= 0 (0 means greedy)",
        )
        _check(
            _is_num(self.top_p) and 0 < self.top_p <= 1, "top_p", self.top_p, "a number in (0, 1]"
        )
        _check(
            _is_int(self.top_k) and (self.top_k == -1 or self.top_k >= 1),
            "top_k", self.top_k, "-1 (disabled) or an integer >= 1",
        )
        _check(
            _is_int(self.max_tokens) and self.max_tokens >= 1,
            "max_tokens", self.max_tokens, "an integer >= 1",
        )
        _check(
            _is_int(self.min_tokens) and 0 <= self.min_tokens <= self.max_tokens,
            "min_tokens", self.min_tokens, f"an integer in [0, max_tokens={self.max_tokens}]",
        )
        _check(
            self.seed is None or _is_int(self.seed), "seed", self.seed, "an integer or None"
        )
        _check(
            all(isinstance(s, str) and s for s in self.stop),
            "stop", self.stop, "a list of non-empty strings",
        )
        _check(
            all(t >= 0 for t in self.stop_token_ids),
            "stop_token_ids", self.stop_token_ids, "a list of token ids >= 0",
        )

    @property
    def greedy(self) -> bool:
        return self.temperature == 0 or self.top_k == 1

    def to_dict(self) -> dict[str, Any]:
        """Plain fields (lists copied), for a msgpack message; asdict's deep copy is slow."""
        return {name: (list(v) if isinstance(v := getattr(self, name), list) else v)
                for name in self.__dataclass_fields__}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> SamplingParams:
        unknown = set(data) - set(cls.__dataclass_fields__)
        if unknown:
            allowed = ", ".join(sorted(cls.__dataclass_fields__))
            raise SamplingParamsError(
                f"unknown sampling parameter(s) {sorted(unknown)}; allowed: {allowed}"
            )
        return cls(**data)


def _is_int(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _is_num(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and x == x


def _check(ok: bool, name: str, value: Any, allowed: str) -> None:
    if not ok:
        raise SamplingParamsError(f"invalid {name}={value!r}; {name} must be {allowed}")
