"""Turning a client's Submit into what the router needs: token ids, checked sampling, a route.

Everything a client can get wrong is caught here and raised as `GatewayError` naming the
field, so a bad request costs one error reply and never the service.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from common.protocol import Submit
from services.worker.engine.sampling_params import SamplingParams, SamplingParamsError

ROUTES = ("auto", "collocated", "disaggregated")
MAX_N = 128  # completions per request: n is an admission limit, not only a sampling knob


class GatewayError(Exception):
    """A request the gateway refuses or fails; `code` is the HTTP status, `param` the field."""

    def __init__(self, message: str, code: int = 400, param: str | None = None):
        super().__init__(message)
        self.message = message
        self.code = code
        self.param = param


@dataclass
class Prepared:
    token_ids: list[int]
    params: SamplingParams


def prepare(submit: Submit, tokenizer: Any, vocab_size: int) -> Prepared:
    """Token ids and sampling for `submit`, or GatewayError saying what is wrong.
    `vocab_size` bounds token ids a client sends (the model's, which may be under the
    tokenizer's)."""
    if submit.route not in ROUTES:
        raise GatewayError(
            f"route {submit.route!r} is not one of {', '.join(ROUTES)}", param="route"
        )
    params = parse_sampling(submit.sampling)
    if params.n > MAX_N:
        raise GatewayError(f"invalid n={params.n}; this gateway allows at most {MAX_N} "
                           "completions per request", param="n")
    token_ids = tokenize(submit, tokenizer, vocab_size)
    return Prepared(token_ids, params)


def parse_sampling(sampling: Mapping[str, Any]) -> SamplingParams:
    try:
        return SamplingParams.from_dict(dict(sampling))
    except SamplingParamsError as e:
        raise GatewayError(str(e), param=_param_of(str(e))) from None
    except (TypeError, ValueError) as e:  # e.g. stop=5 or stop_token_ids=["a"]
        raise GatewayError(f"invalid sampling parameters: {e}") from None


def _param_of(message: str) -> str | None:
    m = re.match(r"invalid (\w+)=", message)
    return m.group(1) if m else None


def tokenize(submit: Submit, tokenizer: Any, vocab_size: int) -> list[int]:
    """`token_ids` as given, else `messages` through the chat template, else `prompt`."""
    if submit.token_ids is not None:
        ids = _check_ids(submit.token_ids, vocab_size)
    elif submit.messages is not None:
        ids = _chat_ids(submit.messages, tokenizer)
    elif submit.prompt is not None:
        if not isinstance(submit.prompt, str):
            raise GatewayError("prompt must be a string", param="prompt")
        ids = list(tokenizer.encode(submit.prompt, add_special_tokens=True))  # BOS etc., as offline
    else:
        raise GatewayError("no prompt: give one of prompt, messages or token_ids", param="prompt")
    if not ids:
        raise GatewayError("the prompt is empty; it needs at least one token", param="prompt")
    return ids


def _check_ids(token_ids: list, vocab_size: int) -> list[int]:
    for t in token_ids:
        if not isinstance(t, int) or isinstance(t, bool) or not 0 <= t < vocab_size:
            raise GatewayError(
                f"token id {t!r} is not an integer in [0, {vocab_size})", param="prompt"
            )
    return list(token_ids)


def _chat_ids(messages: list, tokenizer: Any) -> list[int]:
    if not getattr(tokenizer, "chat_template", None):
        raise GatewayError("this model has no chat template; send a prompt instead",
                           param="messages")
    if not messages:
        raise GatewayError("messages is empty; give at least one message", param="messages")
    conversation = [_message(m, i) for i, m in enumerate(messages)]
    try:
        out = tokenizer.apply_chat_template(
            conversation, add_generation_prompt=True, tokenize=True
        )
    except Exception as e:  # jinja raises its own types for what a template refuses
        raise GatewayError(f"the chat template refused these messages: {e}",
                           param="messages") from None
    if isinstance(out, Mapping):  # transformers 5 returns a BatchEncoding
        out = out["input_ids"]
    return list(out)


def _message(m: Any, i: int) -> dict[str, str]:
    if not isinstance(m, Mapping) or not isinstance(m.get("role"), str):
        raise GatewayError(f"messages[{i}] must be an object with a string role",
                           param="messages")
    content = m.get("content")
    if content is None:
        content = ""
    if isinstance(content, list):  # OpenAI content parts: keep the text ones
        parts = [p.get("text", "") for p in content if isinstance(p, Mapping)
                 and p.get("type") == "text"]
        content = "".join(parts)
    if not isinstance(content, str):
        raise GatewayError(f"messages[{i}].content must be a string or a list of text parts",
                           param="messages")
    return {"role": m["role"], "content": content}
