"""An OpenAI-compatible cloud for the tests: the real wire format, deterministic answers, habits.

The edge's cloud fallback talks to a paid API the tests cannot call; this stands in for it as a
real aiohttp app on loopback (`serving(cloud.app())`, or `running_cloud(...)`), close enough to
OpenAI's `/v1` that the `openai` SDK accepts it unchanged: `POST /v1/chat/completions` (buffered,
or SSE chunks ending in `data: [DONE]`, the usage chunk only for `stream_options.include_usage`),
`POST /v1/embeddings` (floats, or base64 float32 as the SDK asks by default), `GET /v1/models`,
and errors in OpenAI's `{"error": {message, type, param, code}}` shape. A reply is `N` words
`tok0 tok1 ...`, `N` being the request's `max_completion_tokens` or `max_tokens` capped by
`reply_tokens`; its usage counts the prompt's words. Habits, plain attributes a test sets on an
instance at any time, make it misbehave as clouds do: `fail_with` an error status, `hang`
without answering, `die_after_tokens` to drop the connection mid-answer, `tool_arguments` to
call the request's first tool. Every request is kept in `requests`, the barred ones too, so a
test can assert what reached "the cloud" and what did not.
"""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

import orjson
from aiohttp import web
from aiohttp.typedefs import Handler
from multidict import CIMultiDict

from tests.support import openai_wire as wire
from tests.support.servers import serving

CHAT_MODEL = "gpt-4o-mini"
EMBEDDING_MODEL = "text-embedding-3-small"

# OpenAI's error bodies for the statuses `fail_with` takes, as api.openai.com words them.
ERRORS: dict[int, tuple[str, str, str | None]] = {
    400: ("invalid_request_error", "Invalid request.", None),
    401: (
        "invalid_request_error",
        "Incorrect API key provided. You can find your API key at "
        "https://platform.openai.com/account/api-keys.",
        "invalid_api_key",
    ),
    403: ("invalid_request_error", "Project does not have access to this model.", None),
    429: (
        "requests",
        "Rate limit reached for requests. Please try again in {retry_after}s.",
        "rate_limit_exceeded",
    ),
    500: (
        "server_error",
        "The server had an error while processing your request. Sorry about that!",
        None,
    ),
    503: ("server_error", "The engine is currently overloaded, please try again later.", None),
}


@dataclass
class SeenRequest:
    """One request as it reached the stand-in, before any check."""

    method: str
    path: str
    headers: CIMultiDict[str]
    body: Any  # the parsed JSON, or None when the body was empty or not JSON
    raw: bytes
    cancelled: bool = False  # the client left before the answer ended
    ended: asyncio.Event = field(default_factory=asyncio.Event, repr=False)  # answered or not


SEEN = web.RequestKey("seen", SeenRequest)


@dataclass
class CloudStandIn:
    """The stand-in's settings and habits; change any of them between (or during) requests."""

    api_key: str = "sk-test-cloud"
    models: tuple[str, ...] = (CHAT_MODEL, EMBEDDING_MODEL)
    reply_tokens: int = 8  # the reply's words when the request asks for no fewer
    tokens_per_s: float | None = None  # pacing: None answers at once
    embedding_dims: int = 8
    # Habits.
    fail_with: int | None = None  # answer every request with this status (a key in ERRORS)
    fail_times: int | None = None  # ... only the next N requests (None: until changed)
    retry_after: int = 1  # seconds, in a 429's Retry-After and message
    hang: bool = False  # accept the request and never answer (until the server stops)
    die_after_tokens: int | None = None  # close the connection after this many tokens
    tool_arguments: dict[str, Any] | None = None  # call the request's first tool with these
    requests: list[SeenRequest] = field(default_factory=list)
    url: str = ""  # set by `running_cloud`
    _stopping: asyncio.Event = field(default_factory=asyncio.Event, init=False, repr=False)
    _serial: Iterator[int] = field(default_factory=itertools.count, init=False, repr=False)

    def app(self) -> web.Application:
        app = web.Application(middlewares=[self._gate])
        app.router.add_post("/v1/chat/completions", self._chat)
        app.router.add_post("/v1/embeddings", self._embeddings)
        app.router.add_get("/v1/models", self._models)
        app.router.add_route("*", "/{tail:.*}", self._unknown)
        app.on_shutdown.append(self._on_shutdown)
        return app

    def bodies(self, path: str) -> list[Any]:
        """The JSON bodies of the requests seen on `path`, oldest first."""
        return [seen.body for seen in self.requests if seen.path == path]

    async def _on_shutdown(self, app: web.Application) -> None:
        self._stopping.set()  # frees hung handlers: the runner would wait for them

    @web.middleware
    async def _gate(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        raw = await request.read()
        try:
            body = orjson.loads(raw) if raw else None
        except orjson.JSONDecodeError:
            body = None
        seen = SeenRequest(request.method, request.path, CIMultiDict(request.headers), body, raw)
        self.requests.append(seen)
        request[SEEN] = seen
        try:
            if self.hang:
                await self._stopping.wait()
                _abort(request)
                return web.Response()
            if request.headers.get("Authorization") != f"Bearer {self.api_key}":
                return _auth_error(request.headers.get("Authorization"))
            if self.fail_with is not None and self.fail_times != 0:
                if self.fail_times is not None:
                    self.fail_times -= 1
                return self._error(self.fail_with)
            return await handler(request)
        except asyncio.CancelledError:
            seen.cancelled = True
            raise
        finally:
            seen.ended.set()

    def _error(self, status: int) -> web.Response:
        kind, message, code = ERRORS[status]
        headers = {"Retry-After": str(self.retry_after)} if status == 429 else {}
        text = message.format(retry_after=self.retry_after)
        return error_response(status, text, kind, code, headers=headers)

    async def _chat(self, request: web.Request) -> web.StreamResponse:
        body = request[SEEN].body
        refused = self._refuse(body, "messages")
        if refused is not None:
            return refused
        requested = body.get("max_completion_tokens") or body.get("max_tokens")
        if not isinstance(requested, int | None) or not isinstance(body["messages"], list):
            return error_response(400, "Invalid type for a parameter.", "invalid_request_error")
        words = min(requested, self.reply_tokens) if requested else self.reply_tokens
        tools = body.get("tools") or []
        calls = self.tool_arguments is not None and bool(tools)
        if calls:
            pieces = wire.argument_pieces(self.tool_arguments or {})
            finish = "tool_calls"
        else:
            pieces = [f"tok{i}" if i == 0 else f" tok{i}" for i in range(words)]
            finish = "length" if requested is not None and requested < self.reply_tokens else "stop"
        counts = wire.usage(wire.prompt_words(body["messages"]), len(pieces))
        answer = wire.ChatAnswer(
            id=f"chatcmpl-standin{next(self._serial):06d}",
            model=body["model"],
            pieces=pieces,
            finish=finish,
            usage=counts,
            tool=wire.tool_name(tools[0]) if calls else None,
        )
        if body.get("stream"):
            options = body.get("stream_options") or {}
            return await self._stream(request, answer, bool(options.get("include_usage")))
        return await self._buffered(request, answer)

    async def _buffered(self, request: web.Request, answer: wire.ChatAnswer) -> web.StreamResponse:
        if self.tokens_per_s:
            await asyncio.sleep(len(answer.pieces) / self.tokens_per_s)
        data = orjson.dumps(answer.completion())
        if self.die_after_tokens is None:
            return web.Response(body=data, content_type="application/json", headers=_headers())
        response = web.StreamResponse(headers=_headers())
        response.content_type = "application/json"
        response.content_length = len(data)
        await response.prepare(request)
        await response.write(data[: len(data) // 2])
        _abort(request)
        return response

    async def _stream(
        self, request: web.Request, answer: wire.ChatAnswer, include_usage: bool
    ) -> web.StreamResponse:
        response = web.StreamResponse(headers=_headers())
        response.content_type = "text/event-stream"
        response.charset = "utf-8"
        await response.prepare(request)
        usage_field = {"usage": None} if include_usage else {}
        for i, chunk in enumerate(answer.chunks()):
            if 0 < i <= len(answer.pieces):  # a token's chunk: paced, and where it may die
                if self.die_after_tokens is not None and i > self.die_after_tokens:
                    _abort(request)
                    return response
                if self.tokens_per_s:
                    await asyncio.sleep(1 / self.tokens_per_s)
            await response.write(wire.sse_event({**chunk, **usage_field}))
        if include_usage:
            await response.write(wire.sse_event(answer.usage_chunk()))
        await response.write(b"data: [DONE]\n\n")
        return response

    async def _embeddings(self, request: web.Request) -> web.Response:
        body = request[SEEN].body
        refused = self._refuse(body, "input")
        if refused is not None:
            return refused
        given = body["input"]
        texts = [given] if isinstance(given, str) or wire.is_tokens(given) else list(given)
        vectors = [wire.vector(text, self.embedding_dims) for text in texts]
        packed = body.get("encoding_format") == "base64"
        data = [
            {"object": "embedding", "index": i, "embedding": wire.as_base64(v) if packed else v}
            for i, v in enumerate(vectors)
        ]
        tokens = sum(len(t) if isinstance(t, list) else len(t.split()) for t in texts)
        answer = {
            "object": "list",
            "data": data,
            "model": body["model"],
            "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
        }
        return web.json_response(answer, dumps=_dumps, headers=_headers())

    async def _models(self, request: web.Request) -> web.Response:
        data = [
            {"id": m, "object": "model", "created": wire.CREATED, "owned_by": "system"}
            for m in self.models
        ]
        return web.json_response({"object": "list", "data": data}, dumps=_dumps)

    async def _unknown(self, request: web.Request) -> web.Response:
        message = f"Invalid URL ({request.method} {request.path})"
        return error_response(404, message, "invalid_request_error", None)

    def _refuse(self, body: Any, needed: str) -> web.Response | None:
        """OpenAI's 400 or 404 for a body it would not take, else None."""
        if not isinstance(body, dict):
            return error_response(
                400, "We could not parse the JSON body of your request.", "invalid_request_error"
            )
        for name in ("model", needed):
            if name not in body:
                message = f"Missing required parameter: '{name}'."
                return error_response(400, message, "invalid_request_error", param=name)
        if body["model"] not in self.models:
            message = f"The model `{body['model']}` does not exist or you do not have access to it."
            return error_response(404, message, "invalid_request_error", "model_not_found")
        return None


@asynccontextmanager
async def running_cloud(**settings: Any) -> AsyncIterator[CloudStandIn]:
    """A `CloudStandIn(**settings)` served on loopback, its `url` set (no `/v1`)."""
    cloud = CloudStandIn(**settings)
    async with serving(cloud.app()) as url:
        cloud.url = url
        yield cloud


def error_response(
    status: int,
    message: str,
    kind: str,
    code: str | None = None,
    *,
    param: str | None = None,
    headers: dict[str, str] | None = None,
) -> web.Response:
    """An error as OpenAI sends it: `{"error": {message, type, param, code}}`."""
    error = {"message": message, "type": kind, "param": param, "code": code}
    return web.json_response(
        {"error": error}, status=status, dumps=_dumps, headers={**_headers(), **(headers or {})}
    )


def _auth_error(header: str | None) -> web.Response:
    if not header:
        message = (
            "You didn't provide an API key. You need to provide your API key in an "
            "Authorization header using Bearer auth (i.e. Authorization: Bearer YOUR_KEY)."
        )
        return error_response(401, message, "invalid_request_error")
    kind, message, code = ERRORS[401]
    return error_response(401, message, kind, code)


def _abort(request: web.Request) -> None:
    assert request.transport is not None
    request.transport.abort()


def _headers() -> dict[str, str]:
    return {"x-request-id": "req_standin", "openai-processing-ms": "1"}


def _dumps(obj: Any) -> str:
    return orjson.dumps(obj).decode()
