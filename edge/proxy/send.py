"""One attempt at an answer from one agent: send, read the status, answer or relay it.

`edge.proxy.handler.forward` chooses the agent (and retries on another before the first byte);
`attempt()` sends the checked body once and turns what comes back into the client's response:
a buffered answer with its figures (X-Tok-Per-S, X-Gen-Time, X-Tokens), a filtered model list,
or a relayed stream (`edge.proxy.relay`) whose GPU slot is released the moment the upstream ends.
Before response headers every failure is an `EdgeError` (`Agent.errors()` translates aiohttp's);
after them only the cut is left, after an error line in the stream's own shape.

Resource handling: the upstream response is released to the connection pool only when it was
read to the end; on any other exit (the client went away, the stream broke) it is closed, which
closes the connection and makes the model server stop generating.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable
from typing import Any

import aiohttp
import orjson
import structlog
from aiohttp import hdrs, web

from edge.errors import NotSupported, UpstreamBusy, UpstreamFailed, UpstreamUnavailable
from edge.exchange import Exchange
from edge.proxy import cloud_route, ollama, relay, usage
from edge.proxy.usage import NS_PER_S, Usage
from edge.routes import Kind, Route
from edge.services import Edge
from edge.settings import EdgeSettings
from edge.upstreams import connections
from edge.upstreams.agent import Agent
from edge.upstreams.base import REFUSED_STATUSES

STREAM_TYPES = ("application/x-ndjson", "text/event-stream")
# How much of a model server's 5xx message the log keeps (the client gets none of it).
_LOGGED_MESSAGE_CHARS = 500

log = structlog.get_logger(__name__)


async def attempt(
    request: web.Request,
    edge: Edge,
    ex: Exchange,
    route: Route,
    payload: bytes | None,
    agent: Agent,
    release_slot: Callable[[], None],
) -> web.StreamResponse:
    settings = edge.settings
    # Built from scratch, never copied from the client: a loopback Host (set by aiohttp from
    # the URL), no Origin (Ollama refuses unknown origins), no cookies, never the caller's
    # credential; the edge's own, if it has one, is a header of its sessions (`connections`).
    headers = {hdrs.ACCEPT_ENCODING: "identity", "X-Request-Id": ex.id}
    if payload is not None:
        headers[hdrs.CONTENT_TYPE] = "application/json"
    ex.record.upstream, ex.record.agent = agent.url, agent.name
    url = agent.url + route.path
    t0 = time.perf_counter()
    waiting = agent.monitor.waiting(settings.read_timeout)
    with agent.errors(waiting):
        async with waiting:
            upstream = await connections.send(
                edge.sessions, ex.record, route.method, url, payload, headers
            )
    ex.record.ttfb_ms = round((time.perf_counter() - t0) * 1000.0, 3)
    agent.monitor.answered_at = time.monotonic()
    try:
        content_type = upstream.headers.get(hdrs.CONTENT_TYPE, "application/json")
        if upstream.status == 200 and content_type.startswith(STREAM_TYPES):
            response = await _relay_stream(
                request, settings, ex, upstream, content_type, t0, release_slot
            )
        else:
            with agent.errors():
                body = await upstream.read()
            ex.upstream_s = time.perf_counter() - t0
            response = buffered(ex, route, upstream.status, content_type, body, edge, agent)
    except BaseException:
        upstream.close()
        raise
    upstream.release()
    return response


def buffered(
    ex: Exchange,
    route: Route,
    status: int,
    content_type: str,
    body: bytes,
    edge: Edge,
    agent: Agent,
) -> web.Response:
    if status == 503:
        raise UpstreamBusy(
            f"the model server is busy: {_upstream_message(body)}",
            headers={"Retry-After": agent.monitor.retry_after},
        )
    if status >= 500:
        log.warning(
            "upstream.failed",
            status=status,
            message=_upstream_message(body)[:_LOGGED_MESSAGE_CHARS],
        )
        raise UpstreamFailed(status)
    if status in REFUSED_STATUSES:  # the edge's credential, not the caller's: never sent
        raise agent.monitor.refused(status)
    if status == 404 and not route.openai and not ollama.is_ollama_error(body):
        raise NotSupported(ollama.openai_only(route.path))
    if status >= 400:  # the model server's word on the request (404 model not found, 400): kept
        ex.record.type = "upstream_error"
        return response(ex, status, content_type, body, {})
    extra: dict[str, str] = {}
    if route.kind is Kind.LIST:
        allows = model_filter(edge, ex)
        body = orjson.dumps(ollama.filter_models(_upstream_json(body), allows))
    elif route.kind is Kind.SHOW:
        body = orjson.dumps(ollama.filter_show(_upstream_json(body)))
    elif route.kind is Kind.GENERATE:
        figures = usage.from_body(body, openai=route.openai)
        _record_usage(ex, figures, ex.upstream_s)
        extra["X-Gen-Time"] = f"{ex.upstream_s:.3f}"
        if figures.tokens is not None:
            extra["X-Tokens"] = str(figures.tokens)
        if ex.record.tok_per_s is not None:
            extra["X-Tok-Per-S"] = f"{ex.record.tok_per_s:.2f}"
    elif route.kind is Kind.EMBED:
        _record_usage(ex, usage.from_body(body, openai=route.openai), ex.upstream_s)
        extra["X-Gen-Time"] = f"{ex.upstream_s:.3f}"
    return response(ex, status, content_type, body, extra)


def _upstream_json(body: bytes) -> Any:
    """The upstream's JSON answer, which the edge must read to filter it."""
    try:
        return orjson.loads(body)
    except orjson.JSONDecodeError:
        raise UpstreamUnavailable("the model server's answer is not JSON") from None


def model_filter(edge: Edge, ex: Exchange) -> Callable[[str], bool]:
    """The models this caller may see listed: the edge's allowlist, then its key's own."""
    policy, key = edge.models, ex.key
    if key is None or not key.models:
        return policy.allows
    return lambda model: policy.allows(model) and key.allows_model(model)


def response(
    ex: Exchange, status: int, content_type: str, body: bytes, extra: dict[str, str]
) -> web.Response:
    ex.record.bytes_out = len(body)
    extra["X-Edge-Overhead-Ms"] = f"{ex.overhead_ms():.3f}"
    if ex.record.agent is not None:
        extra[cloud_route.SERVED_BY] = ex.record.agent
    response = web.Response(status=status, body=body, headers=extra)
    response.headers[hdrs.CONTENT_TYPE] = content_type
    return response


def _upstream_message(body: bytes) -> str:
    try:
        obj = orjson.loads(body)
    except orjson.JSONDecodeError:
        return "no details"
    error = obj.get("error") if isinstance(obj, dict) else None
    if isinstance(error, dict):
        error = error.get("message")
    return str(error) if error else "no details"


def _record_usage(ex: Exchange, figures: Usage, wall_s: float | None) -> None:
    """Record an answer's figures: the model server's own where it reports them, else timed
    over `wall_s` (a stream's first token to its end; a buffered answer's whole upstream time,
    prompt included, so `speed_source` says "measured"). A buffered answer's time to first
    token is the server's own prompt time, when it gives one: the edge cannot see that token."""
    record = ex.record
    record.prompt_tokens = figures.prompt_tokens
    record.tokens = figures.tokens
    gen_s = figures.eval_ns / NS_PER_S if figures.eval_ns else wall_s
    record.gen_ms = round(gen_s * 1000.0, 3) if gen_s is not None else None
    speed = figures.tok_per_s(wall_s)
    record.tok_per_s = round(speed, 2) if speed is not None else None
    if speed is not None:
        record.speed_source = "server" if figures.server_speed else "measured"
    if not record.stream and figures.prompt_ns is not None:
        record.ttft_ms = round(figures.prompt_ns / 1e6, 3)


def _with_count(ex: Exchange, facts: relay.StreamFacts, figures: Usage) -> Usage:
    """`figures`, or where the upstream reported no generated tokens, the relay's count with
    the prompt estimated from its size: an OpenAI-style stream without `include_usage`
    carries no usage (llama.cpp's alone still carries its `timings`, which `figures` read
    first), and a stream cut short never reaches its final figures. Why the edge counts
    rather than asking the upstream for usage: `edge.proxy.usage`."""
    if figures.tokens is not None:
        return figures
    prompt = figures.prompt_tokens
    if prompt is None:
        prompt = usage.estimate_prompt_tokens(ex.record.prompt_chars)
    return dataclasses.replace(figures, prompt_tokens=prompt, tokens=facts.count.tokens)


async def _relay_stream(
    request: web.Request,
    settings: EdgeSettings,
    ex: Exchange,
    upstream: aiohttp.ClientResponse,
    content_type: str,
    t0: float,
    release_slot: Callable[[], None],
) -> web.StreamResponse:
    """Relay a streamed answer byte for byte, releasing the GPU slot when the upstream ends.

    The answer's figures are the upstream's own when it reported them, else the relay's count
    (`_with_count`): a key's tokens per minute are charged either way, whether or not the
    client asked for usage and however the stream ended.
    """
    response = web.StreamResponse(
        status=200,
        headers={
            hdrs.CONTENT_TYPE: content_type,
            hdrs.CACHE_CONTROL: "no-cache",
            "X-Accel-Buffering": "no",  # nginx/Caddy in front: do not buffer this stream
            cloud_route.SERVED_BY: ex.record.agent or "",
        },
    )
    await response.prepare(request)
    ex.headers_sent = True
    ex.record.stream = True
    sse = content_type.startswith("text/event-stream")
    facts = relay.StreamFacts()

    def upstream_ended() -> None:
        # The GPU's part is over: the next caller may have the slot while this client reads.
        release_slot()
        if facts.broken or facts.upstream_end is None:
            return
        ex.upstream_s = facts.upstream_end - t0
        # The edge's own time up to here; the client's reading time is not the edge's.
        ex.record.overhead_ms = round(ex.overhead_ms(), 3)
        end = facts.tail.bytes()
        figures = usage.from_sse_tail(end) if sse else usage.from_ndjson_tail(end)
        figures = _with_count(ex, facts, figures)
        # The generation clock starts at the first token, not the first chunk (`relay`).
        first = facts.first_token
        _record_usage(ex, figures, facts.upstream_end - first if first is not None else None)

    try:
        outcome = await relay.relay(
            request,
            response,
            upstream,
            facts,
            sse=sse,
            buffer_bytes=settings.stream_buffer_bytes,
            write_timeout=settings.write_timeout,
            on_upstream_end=upstream_ended,
        )
    finally:
        ex.record.bytes_out += facts.bytes_out
        first = facts.first_token
        if first is not None:
            ex.record.ttft_ms = round((first - t0) * 1000.0, 3)
        if ex.record.tokens is None:  # cut before its figures: the client went, or it broke
            end = facts.upstream_end or time.perf_counter()
            gen_s = end - first if first is not None else None
            _record_usage(ex, _with_count(ex, facts, Usage()), gen_s)
    if outcome is relay.Outcome.UPSTREAM_BROKEN:
        # Headers are gone: the client got an error line in the stream's own shape, then a cut.
        ex.record.outcome, ex.record.type = "upstream_broken", "upstream_broken"
    elif outcome is relay.Outcome.CLIENT_STALLED:
        ex.record.outcome = "client_stalled"
    return response
