"""The request path from a parsed body to the client's last byte (DESIGN.md §4, steps 3-7).

Before response headers are sent, every failure becomes a status (an `EdgeError`); after
`prepare()` a failure can only cut the stream, which the client sees as a truncated body (for
NDJSON and SSE, after an error line in the route's own shape). Library exceptions from aiohttp's
client are translated in one place, `Agent.errors()` (edge.upstreams.agent); which agent serves,
and the failover before the first byte, is `forward()` with the pool (edge.upstreams.pool).

Resource handling: the upstream response is released to the connection pool only when it was
read to the end; on any other exit (the client went away, the stream broke) it is closed, which
closes the connection and makes the model server stop generating. The gate slot of an inference
request is held by `forward()`'s `with` block, but a streamed answer releases it as soon as its
upstream ends (`edge.proxy.relay`): a client still reading the rest never holds the GPU.
"""

from __future__ import annotations

import asyncio
import dataclasses
import time
from collections.abc import Callable
from typing import Any

import aiohttp
import orjson
import structlog
from aiohttp import hdrs, web

from edge.errors import (
    ConnectionLost,
    EdgeError,
    Forbidden,
    InvalidRequest,
    ModelNotFound,
    NotSupported,
    Overloaded,
    PayloadTooLarge,
    RequestTimeout,
    UpstreamBusy,
    UpstreamFailed,
    UpstreamUnavailable,
)
from edge.exchange import EXCHANGE, Exchange
from edge.models import canonical_model
from edge.proxy import body_json, body_limits, cloud_route, lists, ollama, relay, usage
from edge.proxy.usage import NS_PER_S, Usage
from edge.routes import Kind, Route
from edge.services import EDGE, Edge
from edge.settings import EdgeSettings
from edge.upstreams import connections
from edge.upstreams.affinity import SESSION_HEADER, conversation_key
from edge.upstreams.agent import Agent
from edge.upstreams.base import REFUSED_STATUSES
from edge.upstreams.pool import MAX_RETRIES, RETRYABLE, Pool

STREAM_TYPES = ("application/x-ndjson", "text/event-stream")
# A buffered answer larger than this is written by the handler under the write timeout: left to
# aiohttp, a client that stopped reading it would keep the connection forever. Smaller ones
# (nearly all) fit the connection's send buffer and are left to aiohttp, as before.
_SEND_UNDER_TIMEOUT_BYTES = 64 * 1024
# Routes whose body names the model that decides which workstation may serve them.
_MODEL_ROUTES = (Kind.GENERATE, Kind.EMBED, Kind.SHOW)
# How much of a model server's 5xx message the log keeps (the client gets none of it).
_LOGGED_MESSAGE_CHARS = 500

log = structlog.get_logger(__name__)


async def proxy(request: web.Request) -> web.StreamResponse:
    """Handle one allowlisted route: check the body, wait for a slot, forward, relay."""
    ex: Exchange = request[EXCHANGE]
    route = ex.route
    assert route is not None
    edge = request.app[EDGE]
    settings = edge.settings
    payload: bytes | None = None
    if route.has_body:
        # Read before the gate, so a client trickling its body never holds a GPU slot.
        body = await _read_json(request, ex, settings.max_body_bytes, settings.body_timeout)
        # The upstream gets the body the edge built, never the client's bytes: the checks
        # below hold in the model server's reading because it reads only what they checked.
        built = edge.body_policy.build(route, body)
        facts = built.facts
        ex.record.model, ex.record.stream = facts.model, facts.stream
        ex.record.prompt_chars = facts.prompt_chars
        body_limits.check(built.body, edge.body_limits)
        if route.kind is Kind.GENERATE and edge.pool.affinity_on:
            caller = f"key:{ex.key.name}" if ex.key is not None else f"addr:{ex.record.client}"
            session = request.headers.get(SESSION_HEADER)
            ex.conversation = conversation_key(caller, facts.model, built.body, session)
        if ex.key is not None and not ex.key.allows_model(facts.model):
            raise Forbidden(f"model '{facts.model}' is not allowed for this API key")
        try:
            payload = orjson.dumps(built.body)
        except orjson.JSONEncodeError:  # orjson writes 255 levels at most, reads 1,024
            raise InvalidRequest("the request body is nested too deeply") from None
    response = await forward(request, edge, ex, route, payload)
    return await _send_large(request, ex, response, settings.write_timeout)


async def _send_large(
    request: web.Request, ex: Exchange, response: web.StreamResponse, write_timeout: float
) -> web.StreamResponse:
    """Write a large buffered answer now, cutting a client that takes nothing for
    `write_timeout` (`client_stalled`); the gate slot was released before this."""
    if not isinstance(response, web.Response) or response.prepared:
        return response
    if (response.content_length or 0) <= _SEND_UNDER_TIMEOUT_BYTES:
        return response
    await response.prepare(request)
    ex.headers_sent = True
    try:
        async with asyncio.timeout(write_timeout):
            await response.write_eof()
    except TimeoutError:
        ex.record.outcome = "client_stalled"
        if request.transport is not None:
            request.transport.abort()
    return response


async def forward(
    request: web.Request, edge: Edge, ex: Exchange, route: Route, payload: bytes | None
) -> web.StreamResponse:
    """Send a checked `payload` to `route` on the agent the pool chooses (DESIGN.md §7.2): 404
    or 503 at once when none can serve it, a gate slot for inference, then relay. A failure
    before any byte reached the client is sent again to another candidate, at most
    `MAX_RETRIES` times. Feature endpoints (edge.proxy.features) call it too."""
    pool = edge.pool
    named = ex.record.model if route.kind in _MODEL_ROUTES else None
    model = canonical_model(named) if named else None
    if route.kind is Kind.LIST and len(pool.agents) > 1:
        listing, answered = await lists.merged(request, edge, ex, route)
        ex.record.agent = lists.ALL_AGENTS if len(answered) > 1 else answered[0]
        body = orjson.dumps(ollama.filter_models(listing, _model_filter(edge, ex)))
        return _response(ex, 200, "application/json", body, {})
    inference = route.kind in (Kind.GENERATE, Kind.EMBED)
    cloud = edge.fallbacks.for_request(ex, named) if inference else None
    if cloud is None:
        return await _local(request, edge, ex, route, payload, model, None)
    if _too_long(edge, ex):
        return await cloud_route.serve(request, edge, ex, route, payload, cloud, "context_window")
    try:
        return await _local(request, edge, ex, route, payload, model, edge.fallbacks.wait)
    except FALLBACK_ON as failure:
        if ex.headers_sent:
            raise
        return await cloud_route.serve(request, edge, ex, route, payload, cloud, failure.type)


# What the workstations' failure to serve looks like, before any byte: none serves the model,
# none is connected, every one stayed busy past `fallback_wait`, or the last try failed.
FALLBACK_ON = (ModelNotFound, Overloaded, *RETRYABLE)


def _too_long(edge: Edge, ex: Exchange) -> bool:
    """The prompt, as estimated from its size, is longer than the local models' context."""
    limit = edge.fallbacks.context_tokens
    estimate = usage.estimate_prompt_tokens(ex.record.prompt_chars)
    return limit is not None and estimate is not None and estimate > limit


async def _local(
    request: web.Request,
    edge: Edge,
    ex: Exchange,
    route: Route,
    payload: bytes | None,
    model: str | None,
    wait: float | None,
) -> web.StreamResponse:
    """Serve from the workstations: the loop of `forward()`'s doc; `wait` bounds the queue."""
    pool = edge.pool
    tried: list[Agent] = []
    while True:
        candidates = pool.candidates(model, avoid=tried)
        agent: Agent | None = None
        try:
            if route.kind in (Kind.GENERATE, Kind.EMBED):
                key, limit = gate_key(ex)
                pick = pool.picker(candidates, model, ex.conversation)
                async with pool.gate.slot(key, limit, pick, wait) as slot:
                    assert isinstance(slot.seat, Agent)
                    agent = slot.seat
                    queued = (ex.record.queue_ms or 0.0) + slot.queue_ms
                    ex.record.queue_ms = round(queued, 3)
                    release = await _leased(edge, agent, slot.release)
                    if release is None:  # other edges hold its other slots: wait for one here
                        continue
                    try:
                        response = await _forward(request, edge, ex, route, payload, agent, release)
                    finally:
                        release()
            else:
                agent = candidates[0]
                response = await _forward(request, edge, ex, route, payload, agent, _no_slot)
        except RETRYABLE as failure:
            if agent is None or ex.headers_sent:
                raise
            pool.failed(agent, failure.type)
            if isinstance(failure, ConnectionLost):
                # Its own reconnect may have ended the wait: the same agent may take it again.
                await pool.wait_reachable(model)
            else:
                tried.append(agent)
            if ex.record.failovers >= MAX_RETRIES or not _others(pool, model, tried):
                raise
            ex.record.failovers += 1
            log.info("pool.failover", agent=agent.name, error=failure.type, attempt=len(tried))
            continue
        if ex.record.outcome == "upstream_broken":
            pool.failed(agent, "upstream_broken")
        else:
            pool.served(agent, ex.conversation, ex.record)
        record = ex.record
        record.served_by = agent.name
        record.cost_usd = edge.fallbacks.reference_cost(record.prompt_tokens, record.tokens)
        return response


async def _leased(
    edge: Edge, agent: Agent, release: Callable[[], None]
) -> Callable[[], None] | None:
    """With edges that share their gate (`edge.cluster.leases`): `release` that also gives
    the agent's lease back, or None when the other edges hold all of its slots. Alone:
    `release`."""
    if edge.cluster is None:
        return release
    leases = edge.cluster.leases
    lease = await leases.take(agent)
    if lease is None:
        return None
    given = False

    def release_both() -> None:
        nonlocal given
        release()
        if not given:
            given = True
            leases.give_back(agent, lease)

    return release_both


def _others(pool: Pool, model: str | None, tried: list[Agent]) -> bool:
    """Whether another candidate is left for a request that failed on each of `tried`."""
    try:
        return bool(pool.candidates(model, avoid=tried))
    except EdgeError:
        return False


def gate_key(ex: Exchange) -> tuple[str, int | None]:
    """Who the gate shares slots between: an API key (with its own concurrency limit, if it
    has one), else the client's address, shared by every anonymous caller behind it."""
    if ex.key is not None:
        return f"key:{ex.key.name}", ex.key.max_concurrency
    return f"addr:{ex.record.client or '-'}", None


def _no_slot() -> None:
    """Release nothing: the route does not take a gate slot."""


async def _read_json(request: web.Request, ex: Exchange, limit: int, body_timeout: float) -> Any:
    if request.content_length is not None and request.content_length > limit:
        raise PayloadTooLarge(f"the request body is over the {limit}-byte limit")
    try:
        async with asyncio.timeout(body_timeout):
            raw = await request.read()
    except web.HTTPRequestEntityTooLarge:
        raise PayloadTooLarge(f"the request body is over the {limit}-byte limit") from None
    except TimeoutError:
        raise RequestTimeout(
            f"the request body did not arrive within {body_timeout:g} s "
            "(BACKHAUL_EDGE_BODY_TIMEOUT)"
        ) from None
    ex.record.bytes_in = len(raw)
    if not raw:
        raise InvalidRequest("the request body is empty; a JSON object is required")
    # Too deep or too many items is refused unparsed; a large body is read in a worker thread.
    return await body_json.load(raw)


async def _forward(
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
            response = _buffered(ex, route, upstream.status, content_type, body, edge, agent)
    except BaseException:
        upstream.close()
        raise
    upstream.release()
    return response


def _buffered(
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
        return _response(ex, status, content_type, body, {})
    extra: dict[str, str] = {}
    if route.kind is Kind.LIST:
        allows = _model_filter(edge, ex)
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
    return _response(ex, status, content_type, body, extra)


def _upstream_json(body: bytes) -> Any:
    """The upstream's JSON answer, which the edge must read to filter it."""
    try:
        return orjson.loads(body)
    except orjson.JSONDecodeError:
        raise UpstreamUnavailable("the model server's answer is not JSON") from None


def _model_filter(edge: Edge, ex: Exchange) -> Callable[[str], bool]:
    """The models this caller may see listed: the edge's allowlist, then its key's own."""
    policy, key = edge.models, ex.key
    if key is None or not key.models:
        return policy.allows
    return lambda model: policy.allows(model) and key.allows_model(model)


def _response(
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
