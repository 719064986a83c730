"""OpenAI-compatible HTTP on aiohttp, on the gateway's own asyncio loop.

Each handler submits through `Gateway.submit` with an asyncio.Queue as the sink and reads its
replies from it. A handler that ends before its request did (the client went away: aiohttp
cancels the handler, or a write fails) cancels the request, which tells the router.
"""

from __future__ import annotations

import asyncio
import json
import time
from typing import TYPE_CHECKING, Any

from aiohttp import web

from common.protocol import Accepted, Error, Message, TokenDelta
from services.gateway import openai_api as api
from services.gateway.intake import GatewayError

if TYPE_CHECKING:
    from services.gateway.main import Gateway
    from services.gateway.requests import Request

GATEWAY_KEY: web.AppKey[Gateway] = web.AppKey("gateway")
MAX_BODY_BYTES = 64 * 2**20
SHUTDOWN_TIMEOUT_S = 1.0


def make_app(gateway: Gateway) -> web.Application:
    app = web.Application(client_max_size=MAX_BODY_BYTES)
    app[GATEWAY_KEY] = gateway
    app.router.add_post("/v1/completions", completions)
    app.router.add_post("/v1/chat/completions", chat_completions)
    app.router.add_get("/v1/models", models)
    app.router.add_get("/health", health)
    return app


async def start_http(gateway: Gateway, address: str) -> web.AppRunner:
    """Serve on "host:port"; the runner's cleanup() stops it."""
    host, _, port = address.rpartition(":")
    runner = web.AppRunner(make_app(gateway), handler_cancellation=True,
                           shutdown_timeout=SHUTDOWN_TIMEOUT_S, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, host or "127.0.0.1", int(port)).start()
    return runner


def error_response(message: str, code: int, param: str | None = None) -> web.Response:
    return web.json_response(api.error_body(message, code, param), status=code)


async def health(request: web.Request) -> web.Response:
    return web.json_response({"status": "ok"})


async def models(request: web.Request) -> web.Response:
    gw = request.app[GATEWAY_KEY]
    return web.json_response({"object": "list", "data": [
        {"id": gw.model_name, "object": "model", "created": 0, "owned_by": "nanopd"}]})


async def completions(request: web.Request) -> web.StreamResponse:
    return await _serve(request, chat=False)


async def chat_completions(request: web.Request) -> web.StreamResponse:
    return await _serve(request, chat=True)


async def _serve(request: web.Request, chat: bool) -> web.StreamResponse:
    gw = request.app[GATEWAY_KEY]
    try:
        body = await request.json()
    except ValueError as e:
        return error_response(f"the request body is not valid JSON: {e}", 400)
    queue: asyncio.Queue[Message] = asyncio.Queue()
    try:
        submit = api.submit_from_body(body, chat)
        req = gw.submit(submit, queue.put_nowait)
    except GatewayError as e:
        return error_response(e.message, e.code, e.param)
    reply = _Reply(gw.tokenizer, gw.model_name, req, chat)
    try:
        if submit.stream:
            options = body.get("stream_options") or {}
            include_usage = isinstance(options, dict) and bool(options.get("include_usage"))
            return await reply.stream(request, queue, include_usage)
        return await reply.collect(queue)
    finally:
        if gw.requests.get(req.rid) is req:  # we stopped before the request did
            gw.cancel(req.rid)


class _Reply:
    """One request's answer, whole or as server-sent events."""

    def __init__(self, tokenizer: Any, model: str, req: Request, chat: bool):
        self.tokenizer = tokenizer
        self.model = model
        self.req = req
        self.chat = chat
        self.created = int(time.time())

    async def collect(self, queue: asyncio.Queue[Message]) -> web.Response:
        deltas: dict[int, TokenDelta] = {}
        while len(deltas) < self.req.params.n:
            msg = await queue.get()
            if isinstance(msg, Error):
                return error_response(msg.message, msg.code)
            if isinstance(msg, TokenDelta):
                deltas[msg.index] = msg
        choices = [api.choice(self.tokenizer, deltas[i], self.chat, stream=False)
                   for i in sorted(deltas)]
        num_output_tokens = sum(len(d.token_ids) for d in deltas.values())
        body = self._envelope(choices, stream=False)
        body["usage"] = api.usage(self.req.num_prompt_tokens, num_output_tokens)
        return web.json_response(body)

    async def stream(self, request: web.Request, queue: asyncio.Queue[Message],
                     include_usage: bool) -> web.StreamResponse:
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream",
                                           "Cache-Control": "no-cache"})
        await resp.prepare(request)
        open_indices = set(range(self.req.params.n))
        started: set[int] = set()
        num_output_tokens = 0
        while open_indices:
            msg = await queue.get()
            if isinstance(msg, Accepted):
                continue
            if isinstance(msg, Error):
                await _event(resp, api.error_body(msg.message, msg.code))
                break
            assert isinstance(msg, TokenDelta)
            num_output_tokens += len(msg.token_ids)
            if msg.finish_reason is not None:
                open_indices.discard(msg.index)
            elif not msg.text and not msg.logprobs and msg.index in started:
                continue  # nothing a client could show yet (half a character, say)
            first = msg.index not in started
            started.add(msg.index)
            choice = api.choice(self.tokenizer, msg, self.chat, stream=True, first=first)
            await _event(resp, self._envelope([choice], stream=True))
        else:
            if include_usage:
                body = self._envelope([], stream=True)
                body["usage"] = api.usage(self.req.num_prompt_tokens, num_output_tokens)
                await _event(resp, body)
        await resp.write(b"data: [DONE]\n\n")
        await resp.write_eof()
        return resp

    def _envelope(self, choices: list[dict[str, Any]], stream: bool) -> dict[str, Any]:
        return api.envelope(self.req.rid, self.model, self.created, self.chat, stream, choices)


async def _event(resp: web.StreamResponse, body: dict[str, Any]) -> None:
    await resp.write(b"data: " + json.dumps(body).encode() + b"\n\n")
