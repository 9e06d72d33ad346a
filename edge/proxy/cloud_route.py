"""Serving a request from its cloud fallback (docs/fallback.md), in the route's own wire format.

`edge.proxy.handler.forward` calls `serve()` only before any byte reached the client, and only
for a request that names a cloud (`Fallbacks.for_request`). An OpenAI route goes as it came, the
model renamed to the cloud's; an Ollama route is translated (`edge.proxy.translate`): the
request to OpenAI's, the answer back to Ollama's JSON or NDJSON stream, so the `ollama` SDK
reads a cloud answer as it reads a local one. Streams ask for `include_usage`, so the answer's
tokens are the cloud's own count; its speed is the edge's clock (`speed_source` "measured": a
cloud reports no timings).

Every answer says where it was made: `X-Backhaul-Served-By: cloud:<name>` (readable from a
browser on an allowed origin) and `served_by` in the telemetry line, with its `cost_usd` from the
cloud's price table. A failure after the first byte is an error line in the stream's shape and
the cut (`upstream_broken`), as for a workstation: never a second answer.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

import aiohttp
import orjson
import structlog
from aiohttp import hdrs, web

from edge.errors import (
    EdgeError,
    UpstreamBusy,
    UpstreamFailed,
    UpstreamRefused,
    UpstreamTimeout,
    UpstreamUnavailable,
)
from edge.exchange import Exchange
from edge.proxy import translate, usage
from edge.proxy.usage import Usage
from edge.routes import Kind, Route
from edge.services import Edge
from edge.upstreams.cloud import CloudUpstream

log = structlog.get_logger(__name__)

SERVED_BY = "X-Backhaul-Served-By"
_TAIL_BYTES = 8192


async def serve(
    request: web.Request,
    edge: Edge,
    ex: Exchange,
    route: Route,
    payload: bytes | None,
    cloud: CloudUpstream,
    reason: str,
) -> web.StreamResponse:
    """Answer `route` from `cloud` because of `reason` (the local failure's type)."""
    body: dict[str, Any] = orjson.loads(payload) if payload else {}
    local_model = str(body.get("model") or "")
    target = cloud.model_for(local_model)
    assert target is not None  # `Fallbacks.for_request` chose a cloud with a model for it
    dropped: list[str] = []
    if route.openai:
        path, sent = route.path, {**body, "model": target}
        if sent.get("stream") and route.kind is Kind.GENERATE:
            sent["stream_options"] = {**(sent.get("stream_options") or {}), "include_usage": True}
    else:
        path, sent, dropped = translate.to_openai(route.path, body, target)
    if dropped:
        log.info("fallback.dropped", cloud=cloud.name, fields=dropped)
    log.info("fallback.serving", cloud=cloud.name, model=target, reason=reason)
    record = ex.record
    record.served_by, record.upstream, record.agent = cloud.served_by, cloud.base_url, None
    headers = {hdrs.CONTENT_TYPE: "application/json", "X-Request-Id": ex.id}
    t0 = time.perf_counter()
    try:
        async with asyncio.timeout(cloud.timeout):
            answer = await cloud.session.post(
                cloud.url(path), data=orjson.dumps(sent), headers=headers
            )
    except TimeoutError:
        raise UpstreamTimeout(f"the cloud fallback ({cloud.name}) did not answer in time") from None
    except aiohttp.ClientError as exc:
        log.warning("fallback.unreachable", cloud=cloud.name, error=repr(exc))
        raise UpstreamUnavailable(
            f"the cloud fallback ({cloud.name}) could not be reached",
            headers={"Retry-After": edge.pool.retry_after},
        ) from None
    record.ttfb_ms = round((time.perf_counter() - t0) * 1000.0, 3)
    try:
        if answer.status >= 400:
            raise _refusal(cloud, answer.status, await answer.read(), answer.headers)
        streamed = answer.headers.get(hdrs.CONTENT_TYPE, "").startswith("text/event-stream")
        if streamed:
            response = await _stream(request, ex, route, answer, local_model, t0)
        else:
            response = await _whole(ex, route, answer, local_model, t0)
    finally:
        answer.close()
    if record.tokens is not None or record.prompt_tokens is not None:
        record.cost_usd = cloud.cost(target, record.prompt_tokens, record.tokens)
    return response


def _refusal(cloud: CloudUpstream, status: int, body: bytes, headers: Any) -> EdgeError:
    """The cloud's error as ours: its refusals are the operator's business, not the caller's."""
    message = translate.error_message(body)[:300]
    log.warning("fallback.refused", cloud=cloud.name, status=status, message=message)
    if status in (401, 403):
        return UpstreamRefused(
            f"the cloud fallback ({cloud.name}) refuses the edge's API key; the operator must "
            "fix its api_key_file. Your own API key is not the cause."
        )
    if status == 429:
        retry = headers.get(hdrs.RETRY_AFTER) or "5"
        return UpstreamBusy(
            f"the cloud fallback ({cloud.name}) is rate-limiting this edge",
            headers={"Retry-After": retry if retry.isdigit() else "5"},
        )
    # Its other errors (a 400 for a prompt past its context, a 5xx): the status, the message
    # in the operator's log only, as for a model server's.
    return UpstreamFailed(status)


async def _whole(
    ex: Exchange,
    route: Route,
    answer: aiohttp.ClientResponse,
    local_model: str,
    t0: float,
) -> web.Response:
    data = await answer.read()
    elapsed = time.perf_counter() - t0
    ex.upstream_s = elapsed
    figures = usage.from_body(data, openai=True)
    if not route.openai:
        try:
            whole = translate.from_openai_json(route.path, orjson.loads(data), local_model, elapsed)
        except (translate.TranslationError, orjson.JSONDecodeError) as exc:
            log.warning("fallback.unreadable", error=str(exc)[:300])
            raise UpstreamUnavailable("the cloud fallback's answer could not be read") from None
        data = orjson.dumps(whole)
    extra = {SERVED_BY: ex.record.served_by or "", "X-Gen-Time": f"{elapsed:.3f}"}
    _figures(ex, figures, elapsed if route.kind is Kind.GENERATE else None)
    if route.kind is Kind.GENERATE:
        if figures.tokens is not None:
            extra["X-Tokens"] = str(figures.tokens)
        if ex.record.tok_per_s is not None:
            extra["X-Tok-Per-S"] = f"{ex.record.tok_per_s:.2f}"
    ex.record.bytes_out = len(data)
    extra["X-Edge-Overhead-Ms"] = f"{ex.overhead_ms():.3f}"
    response = web.Response(status=200, body=data, headers=extra)
    response.headers[hdrs.CONTENT_TYPE] = "application/json"
    return response


async def _stream(
    request: web.Request,
    ex: Exchange,
    route: Route,
    answer: aiohttp.ClientResponse,
    local_model: str,
    t0: float,
) -> web.StreamResponse:
    content_type = "text/event-stream" if route.openai else "application/x-ndjson"
    response = web.StreamResponse(
        status=200,
        headers={
            hdrs.CONTENT_TYPE: content_type,
            hdrs.CACHE_CONTROL: "no-cache",
            "X-Accel-Buffering": "no",
            SERVED_BY: ex.record.served_by or "",
        },
    )
    await response.prepare(request)
    ex.headers_sent = True
    ex.record.stream = True
    convert = None if route.openai else translate.SseToNdjson(route.path, local_model)
    tail = bytearray()
    first: float | None = None
    try:
        async for chunk in answer.content.iter_any():
            out = chunk if convert is None else b"".join(convert.feed(chunk))
            if not out:
                continue
            first = first or time.perf_counter()
            await response.write(out)
            ex.record.bytes_out += len(out)
            tail = (tail + out)[-_TAIL_BYTES:]
        if convert is not None:
            out = b"".join(convert.finish())
            await response.write(out)
            ex.record.bytes_out += len(out)
            tail = (tail + out)[-_TAIL_BYTES:]
    except (aiohttp.ClientPayloadError, aiohttp.ClientConnectionError, TimeoutError):
        line = _broken_line(route)
        await response.write(line)
        ex.record.outcome, ex.record.type = "upstream_broken", "upstream_broken"
        if request.transport is not None:
            request.transport.abort()
        return response
    end = time.perf_counter()
    ex.upstream_s = end - t0
    ex.record.overhead_ms = round(ex.overhead_ms(), 3)
    if first is not None:
        ex.record.ttft_ms = round((first - t0) * 1000.0, 3)
    tail_bytes = bytes(tail)
    read = usage.from_sse_tail if route.openai else usage.from_ndjson_tail
    figures = read(tail_bytes)
    _figures(ex, figures, end - first if first is not None else None)
    await response.write_eof()
    return response


def _broken_line(route: Route) -> bytes:
    message = "the cloud fallback's stream broke off"
    if route.openai:
        kind = "upstream_broken"
        error = {"error": {"message": message, "type": kind, "code": kind}}
        return b"data: " + orjson.dumps(error) + b"\n\n"
    return orjson.dumps({"error": message}) + b"\n"


def _figures(ex: Exchange, figures: Usage, gen_s: float | None) -> None:
    """The answer's tokens as the cloud counted them; its speed by the edge's clock."""
    record = ex.record
    record.prompt_tokens, record.tokens = figures.prompt_tokens, figures.tokens
    if gen_s is not None:
        record.gen_ms = round(gen_s * 1000.0, 3)
        if figures.tokens and gen_s > 0:
            record.tok_per_s = round(figures.tokens / gen_s, 2)
            record.speed_source = "measured"
