"""`POST /features/{name}`: read `{"input": ...}`, ask the pinned model, check, answer.

What a feature is, and the `/api/chat` body it sends, is `edge.proxy.features`.
"""

from __future__ import annotations

from typing import Any

import orjson
import structlog
from aiohttp import web

from edge.errors import (
    InvalidModelOutput,
    InvalidRequest,
    NotFound,
    NotSupported,
    PayloadTooLarge,
)
from edge.exchange import EXCHANGE, Exchange
from edge.models import canonical_model
from edge.proxy import handler as proxy
from edge.proxy.features import FEATURE, Feature, chat_body, openai_chat_body
from edge.routes import BY_PATH
from edge.services import EDGE

log = structlog.get_logger(__name__)

CHAT = BY_PATH["/api/chat"]
OPENAI_CHAT = BY_PATH["/v1/chat/completions"]
# Bytes of request body per character of input allowed: JSON may escape a character as
# `\uXXXX` (6 bytes); plus room for the braces and the key.
_BYTES_PER_CHAR = 6
_BODY_SLACK = 1024
# Longest schema-error text sent back to the caller.
_MAX_DETAIL_CHARS = 300


async def handle(request: web.Request) -> web.StreamResponse:
    """`POST /features/{name}`: read `{"input": ...}`, ask the pinned model, check, answer."""
    ex: Exchange = request[EXCHANGE]
    feature = request.get(FEATURE)
    if feature is None:
        raise NotFound("no such feature")
    stream = request.query.get("stream", "0") not in ("0", "false", "")
    if stream and feature.validator is not None:
        raise InvalidRequest(
            f"feature '{feature.name}' answers checked JSON, which cannot be streamed; "
            "call it without ?stream=1"
        )
    edge = request.app[EDGE]
    openai = edge.pool.openai_only(canonical_model(feature.model))
    if stream and openai:
        raise NotSupported(
            f"feature '{feature.name}' streams Ollama's NDJSON, and this model server is "
            "OpenAI-compatible only: call it without ?stream=1"
        )
    text = await _read_input(request, ex, feature)
    cap = edge.settings.max_output_tokens
    if openai:
        route, body = OPENAI_CHAT, openai_chat_body(feature, text, cap)
    else:
        route, body = CHAT, chat_body(feature, text, stream, cap)
    ex.route = route
    ex.record.model, ex.record.stream = feature.model, stream
    ex.record.prompt_chars = sum(len(m["content"]) for m in body["messages"])
    response = await proxy.forward(request, edge, ex, route, orjson.dumps(body))
    if stream or not isinstance(response, web.Response) or response.status != 200:
        return response
    return _answer(ex, feature, response, openai)


async def _read_input(request: web.Request, ex: Exchange, feature: Feature) -> str:
    limit = feature.config.max_input_chars
    max_bytes = limit * _BYTES_PER_CHAR + _BODY_SLACK
    too_large = PayloadTooLarge(
        f"the input is over feature '{feature.name}''s {limit}-character limit"
    )
    if request.content_length is not None and request.content_length > max_bytes:
        raise too_large
    raw = bytearray()
    async for chunk in request.content.iter_chunked(64 * 1024):
        raw += chunk
        if len(raw) > max_bytes:
            raise too_large
    ex.record.bytes_in = len(raw)
    try:
        obj = orjson.loads(raw)
    except orjson.JSONDecodeError:
        raise InvalidRequest('the body must be JSON: {"input": "..."}') from None
    if not isinstance(obj, dict) or set(obj) != {"input"}:
        raise InvalidRequest('the body must be exactly {"input": "..."}')
    text = obj["input"]
    if not isinstance(text, str) or not text.strip():
        raise InvalidRequest("'input' must be a non-empty string")
    if len(text) > limit:
        raise too_large
    return text


def _answer(ex: Exchange, feature: Feature, response: web.Response, openai: bool) -> web.Response:
    assert isinstance(response.body, bytes)
    try:
        answer = orjson.loads(response.body)
        message = answer["choices"][0]["message"] if openai else answer["message"]
        content = message["content"]
    except (orjson.JSONDecodeError, KeyError, TypeError, IndexError):
        content = None
    if not isinstance(content, str):
        raise InvalidModelOutput("the model server's answer has no message")
    output: Any = content
    if feature.validator is not None:
        output = _checked(ex, feature, content)
    response.body = orjson.dumps({"output": output})
    ex.record.bytes_out = len(response.body)
    return response


def _checked(ex: Exchange, feature: Feature, content: str) -> Any:
    try:
        value = orjson.loads(content)
    except orjson.JSONDecodeError:
        log.warning("feature.invalid_output", feature=feature.name, problem="not JSON")
        raise InvalidModelOutput("the model's answer is not valid JSON") from None
    error = next(iter(feature.validator.iter_errors(value)), None)
    if error is not None:
        where = "/".join(str(p) for p in error.absolute_path) or "(root)"
        log.warning(
            "feature.invalid_output",
            feature=feature.name,
            problem="schema",
            at=where,
        )
        detail = f"at {where}: {error.message}"[:_MAX_DETAIL_CHARS]
        raise InvalidModelOutput(f"the model's answer does not match the schema {detail}")
    return value
