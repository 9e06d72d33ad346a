"""The edge's own answers: `/healthz`, `/readyz`, `/metrics` and `/agents`.

`/healthz` says the process serves; `/readyz` says whether a request would reach the model server
now (probing once if nothing is known yet); `/metrics` is Prometheus's, for a loopback scraper or
the metrics token (`edge.metrics.scrape_access`).
"""

from __future__ import annotations

import structlog
from aiohttp import hdrs, web
from prometheus_client.exposition import choose_encoder

from edge.errors import Forbidden
from edge.exchange import EXCHANGE
from edge.metrics import Scrape, scrape_access
from edge.services import EDGE

log = structlog.get_logger(__name__)


async def root(request: web.Request) -> web.Response:
    """`GET /`: Ollama's own answer, which tools call to check that the server is there. The
    edge's, not the model server's: it says nothing about the agent (that is `/readyz`)."""
    return web.Response(text="Ollama is running")


async def healthz(request: web.Request) -> web.Response:
    """The process is alive and serving; says nothing about the agent."""
    return web.json_response({"status": "ok"})


async def readyz(request: web.Request) -> web.Response:
    """200 when a request can reach a model server now (at least one agent serves), else the
    error a request would get; when ready, each agent's state by name (no models, no
    addresses: this is an open route)."""
    edge = request.app[EDGE]
    pool = edge.pool
    for agent in pool.agents.values():
        # Not known yet (a fresh edge, a new agent): look now rather than say "not ready".
        if not agent.looked and agent.monitor.status.agent_present is not False:
            await agent.check(edge.sessions.pooled)
    agents = {agent.name: agent.monitor.status.state.value for agent in pool.agents.values()}
    unready = pool.unready()
    if unready is not None:
        raise unready
    body: dict[str, object] = {"status": "ready", "agents": agents}
    cluster = edge.cluster
    if cluster is not None:
        # Serving on: limits fall back to this edge's share, bans and keys keep their last state.
        body["redis"] = "up" if cluster.link.up else "down"
        if not cluster.link.up:
            body["status"] = "degraded"
    return web.json_response(body)


async def agents(request: web.Request) -> web.Response:
    """`GET /agents`: the live pool, as `backhaul-edge agents` prints it; to whom `/metrics`
    answers (it names addresses and models)."""
    _scraper_only(request)
    return web.json_response({"agents": request.app[EDGE].pool.snapshot()})


async def metrics(request: web.Request) -> web.Response:
    """`GET /metrics` in the format the scraper asks for (Prometheus text or OpenMetrics)."""
    _scraper_only(request)
    edge = request.app[EDGE]
    encoder, content_type = choose_encoder(request.headers.get(hdrs.ACCEPT, ""))
    body = encoder(edge.metrics.registry)
    return web.Response(
        body=body, headers={hdrs.CONTENT_TYPE: content_type, hdrs.CACHE_CONTROL: "no-store"}
    )


def _scraper_only(request: web.Request) -> None:
    """Refuse (403) all but a loopback scraper and the bearer of the metrics token."""
    ex = request[EXCHANGE]
    edge = request.app[EDGE]
    guard = edge.guard
    client = ex.record.client
    guard.refuse_banned(client)
    token = edge.settings.metrics_token
    access = scrape_access(request.remote, request.headers, token, ex.via_proxy)
    if access is Scrape.GUESS:
        banned = guard.bans.fail(client)
        log.warning("auth.failed", reason="metrics_token", client=client, banned=banned)
    if access is not Scrape.ALLOWED:
        raise Forbidden(
            "metrics are served to loopback scrapers that do not come through a proxy, or with "
            "the metrics token as a bearer token"
        )
