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
        # each check builds its message only when it fails: this runs once per request
        # in the gateway and again in the worker
        if not (_is_int(self.n) and self.n >= 1):
            _fail("n", self.n, "an integer >= 1")
        if not (_is_num(self.temperature) and self.temperature >= 0):
            _fail("temperature", self.temperature, "a number >= 0 (0 means greedy)")
        if not (_is_num(self.top_p) and 0 < self.top_p <= 1):
            _fail("top_p", self.top_p, "a number in (0, 1]")
        if not (_is_int(self.top_k) and (self.top_k == -1 or self.top_k >= 1)):
            _fail("top_k", self.top_k, "-1 (disabled) or an integer >= 1")
        if not (_is_int(self.max_tokens) and self.max_tokens >= 1):
            _fail("max_tokens", self.max_tokens, "an integer >= 1")
        if not (_is_int(self.min_tokens) and 0 <= self.min_tokens <= self.max_tokens):
            _fail("min_tokens", self.min_tokens, f"an integer in [0, max_tokens={self.max_tokens}]")
        if not (self.seed is None or _is_int(self.seed)):
            _fail("seed", self.seed, "an integer or None")
        if self.stop and not all(isinstance(s, str) and s for s in self.stop):
            _fail("stop", self.stop, "a list of non-empty strings")
        if self.stop_token_ids and min(self.stop_token_ids) < 0:
            _fail("stop_token_ids", self.stop_token_ids, "a list of token ids >= 0")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0 or self.top_k == 1

    def to_dict(self) -> dict[str, Any]:
        """Plain fields (lists copied), for a msgpack message; asdict's deep copy is slow."""
        d = {name: getattr(self, name) for name in _FIELD_NAMES}
        d["stop"], d["stop_token_ids"] = list(self.stop), list(self.stop_token_ids)
        return d

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> SamplingParams:
        unknown = data.keys() - cls.__dataclass_fields__.keys()
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


def _fail(name: str, value: Any, allowed: str) -> None:
    raise SamplingParamsError(f"invalid {name}={value!r}; {name} must be {allowed}")


_FIELD_NAMES = tuple(SamplingParams.__dataclass_fields__)
