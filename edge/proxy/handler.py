"""The request path from a parsed body to the client's last byte (DESIGN.md §4, steps 3-7).

Before response headers are sent, every failure becomes a status (an `EdgeError`); after
`prepare()` a failure can only cut the stream, which the client sees as a truncated body (for
NDJSON and SSE, after an error line in the route's own shape). Library exceptions from aiohttp's
client are translated in one place, `Agent.errors()` (edge.upstreams.agent); which agent serves,
and the failover before the first byte, is `forward()` with the pool (edge.upstreams.pool); one
attempt on one agent is `edge.proxy.send`, one on a cloud fallback `edge.proxy.cloud_route`.

Resource handling: the gate slot of an inference
request is held by `_local()`'s `try` block, but a streamed answer releases it as soon as its
upstream ends (`edge.proxy.relay`): a client still reading the rest never holds the GPU.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

import orjson
import structlog
from aiohttp import web

from edge.errors import (
    ConnectionLost,
    EdgeError,
    Forbidden,
    InvalidRequest,
    ModelNotFound,
    Overloaded,
    PayloadTooLarge,
    RequestTimeout,
)
from edge.exchange import EXCHANGE, Exchange
from edge.models import canonical_model
from edge.proxy import body_json, body_limits, cloud_route, lists, ollama, send, usage
from edge.routes import Kind, Route
from edge.services import EDGE, Edge
from edge.upstreams.affinity import SESSION_HEADER, conversation_key
from edge.upstreams.agent import Agent
from edge.upstreams.pool import MAX_RETRIES, RETRYABLE, Pool

# A buffered answer larger than this is written by the handler under the write timeout: left to
# aiohttp, a client that stopped reading it would keep the connection forever. Smaller ones
# (nearly all) fit the connection's send buffer and are left to aiohttp, as before.
_SEND_UNDER_TIMEOUT_BYTES = 64 * 1024
# Routes whose body names the model that decides which workstation may serve them.
_MODEL_ROUTES = (Kind.GENERATE, Kind.EMBED, Kind.SHOW)

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
        # Affinity chooses between agents: with one, a conversation needs no name.
        if route.kind is Kind.GENERATE and edge.pool.affinity_on and len(edge.pool.agents) > 1:
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
        body = orjson.dumps(ollama.filter_models(listing, send.model_filter(edge, ex)))
        return send.response(ex, 200, "application/json", body, {})
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
                slot = await pool.gate.acquire(key, limit, pick, wait)
                try:
                    assert isinstance(slot.seat, Agent)
                    agent = slot.seat
                    queued = (ex.record.queue_ms or 0.0) + slot.queue_ms
                    ex.record.queue_ms = round(queued, 3)
                    release = await _leased(edge, agent, slot.release)
                    if release is None:  # other edges hold its other slots: wait for one here
                        continue
                    try:
                        response = await send.attempt(
                            request, edge, ex, route, payload, agent, release
                        )
                    finally:
                        release()
                finally:
                    slot.release()
            else:
                agent = candidates[0]
                response = await send.attempt(request, edge, ex, route, payload, agent, _no_slot)
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
        if request.content.is_eof():  # it all came with the headers: no wait, no timer
            raw = await request.read()
        else:
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
