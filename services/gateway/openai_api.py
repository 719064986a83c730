"""OpenAI's request and response shapes, as pure functions: a JSON body -> Submit, and
TokenDeltas -> completion objects, stream chunks and error bodies."""

from __future__ import annotations

from typing import Any

from common.protocol import Submit, TokenDelta
from services.gateway.intake import GatewayError

SAMPLING_FIELDS = ("temperature", "top_p", "top_k", "n", "seed", "stop", "stop_token_ids",
                   "ignore_eos", "min_tokens")
# Fields we cannot honour, with the value that means "not used"; anything else is refused.
UNSUPPORTED = {"presence_penalty": 0, "frequency_penalty": 0, "echo": False, "best_of": 1,
               "logit_bias": None, "suffix": None, "tools": None}
DEFAULT_CHAT_MAX_TOKENS = 1024  # the engine still ends at max_model_len
ERROR_TYPES = {400: "invalid_request_error", 404: "not_found_error", 503: "server_error",
               504: "timeout_error"}


def submit_from_body(body: Any, chat: bool) -> Submit:
    """The Submit for a /v1/completions (or, with `chat`, /v1/chat/completions) body."""
    if not isinstance(body, dict):
        raise GatewayError("the request body must be a JSON object")
    for name, unused in UNSUPPORTED.items():
        value = body.get(name)
        if value is not None and value != unused and value not in ({}, [], ""):
            raise GatewayError(f"{name}={value!r} is not supported by this server", param=name)
    stream = body.get("stream", False)
    if not isinstance(stream, bool):
        raise GatewayError(f"stream must be true or false, got {stream!r}", param="stream")
    route = body.get("route", "auto")
    submit = Submit(sampling=_sampling(body, chat), stream=stream, route=route)
    if chat:
        messages = body.get("messages")
        if not isinstance(messages, list):
            raise GatewayError("messages is required: a list of {role, content} objects",
                               param="messages")
        submit.messages = messages
        return submit
    prompt = body.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], (str, list)):
        prompt = prompt[0]  # a batch of one
    if isinstance(prompt, str):
        submit.prompt = prompt
    elif isinstance(prompt, list) and all(isinstance(t, int) for t in prompt):
        submit.token_ids = prompt
    elif prompt is None:
        raise GatewayError("prompt is required: a string or a list of token ids",
                           param="prompt")
    else:
        raise GatewayError("prompt must be a string or a list of token ids; for several "
                           "prompts send one request each", param="prompt")
    return submit


def _sampling(body: dict, chat: bool) -> dict[str, Any]:
    sampling = {k: body[k] for k in SAMPLING_FIELDS if body.get(k) is not None}
    max_tokens = body.get("max_completion_tokens") if chat else None
    if max_tokens is None:
        max_tokens = body.get("max_tokens")
    if max_tokens is None and chat:
        max_tokens = DEFAULT_CHAT_MAX_TOKENS
    if max_tokens is not None:
        sampling["max_tokens"] = max_tokens
    logprobs = body.get("logprobs")
    if logprobs is not None:
        if not isinstance(logprobs, (bool, int)) or logprobs < 0:
            raise GatewayError(f"logprobs must be a boolean or an integer >= 0, got "
                               f"{logprobs!r}", param="logprobs")
        sampling["logprobs"] = logprobs is not False
    if body.get("top_logprobs"):
        raise GatewayError("top_logprobs is not supported; logprobs=true returns the chosen "
                           "token's logprob", param="top_logprobs")
    return sampling


def error_body(message: str, code: int, param: str | None = None) -> dict[str, Any]:
    return {"error": {"message": message, "type": ERROR_TYPES.get(code, "server_error"),
                      "param": param, "code": code}}


def _logprobs(tokenizer: Any, delta: TokenDelta, chat: bool) -> dict[str, Any] | None:
    if delta.logprobs is None:
        return None
    tokens = [tokenizer.decode([t]) for t in delta.token_ids[: len(delta.logprobs)]]
    pairs = zip(tokens, delta.logprobs, strict=False)
    if chat:
        return {"content": [{"token": s, "logprob": lp, "bytes": list(s.encode()),
                             "top_logprobs": []} for s, lp in pairs]}
    offsets, at = [], 0
    for s in tokens:
        offsets.append(at)
        at += len(s)
    return {"tokens": tokens, "token_logprobs": list(delta.logprobs), "top_logprobs": None,
            "text_offset": offsets}


def choice(tokenizer: Any, delta: TokenDelta, chat: bool, stream: bool,
           first: bool = False) -> dict[str, Any]:
    """One entry of `choices`: a response's (whole text) or a chunk's (this delta's text)."""
    out: dict[str, Any] = {"index": delta.index}
    if not chat:
        out["text"] = delta.text
    elif stream:
        out["delta"] = {"role": "assistant", "content": delta.text} if first else \
            {"content": delta.text}
    else:
        out["message"] = {"role": "assistant", "content": delta.text}
    out["logprobs"] = _logprobs(tokenizer, delta, chat)
    out["finish_reason"] = delta.finish_reason
    return out


def envelope(rid: str, model: str, created: int, chat: bool, stream: bool,
             choices: list[dict[str, Any]]) -> dict[str, Any]:
    if chat:
        obj = "chat.completion.chunk" if stream else "chat.completion"
    else:
        obj = "text_completion"
    prefix = "chatcmpl-" if chat else "cmpl-"
    return {"id": prefix + rid, "object": obj, "created": created, "model": model,
            "choices": choices}


def usage(num_prompt_tokens: int, num_output_tokens: int) -> dict[str, int]:
    return {"prompt_tokens": num_prompt_tokens, "completion_tokens": num_output_tokens,
            "total_tokens": num_prompt_tokens + num_output_tokens}
