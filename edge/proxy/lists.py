"""Model listings of a pool: `/api/tags`, `/api/ps` and `/v1/models` merged over its agents.

A client asks one edge what models there are; with several workstations behind it the answer is
every reachable agent's listing, merged: asked at once (each within the probe timeout), each
model once (the first agent's entry, in pool order), then filtered by the allowlists as a single
server's listing is (`edge.proxy.ollama.filter_models`). An agent that fails to answer is left
out of this answer and logged; only when none answers is the request an error.
"""

from __future__ import annotations

import asyncio
from typing import Any

import aiohttp
import orjson
import structlog
from aiohttp import web

from edge.errors import UpstreamUnavailable
from edge.exchange import Exchange
from edge.routes import Route
from edge.services import Edge
from edge.upstreams.agent import Agent

log = structlog.get_logger(__name__)

# The `agent` of a merged listing's telemetry line: every agent that answered.
ALL_AGENTS = "*"


async def merged(
    request: web.Request, edge: Edge, ex: Exchange, route: Route
) -> tuple[Any, list[str]]:
    """The merged listing of `route` over every reachable agent, and the agents that answered.

    Error handling: raises `AgentUnavailable` when no agent is reachable, and
    `UpstreamUnavailable` when none answered with a listing.
    """
    agents = [agent for agent in edge.pool.agents.values() if agent.monitor.reachable]
    if not agents:
        raise edge.pool.unavailable("no workstation is connected")
    answers = await asyncio.gather(*(_listing(edge, ex, route, agent) for agent in agents))
    merged: dict[str, Any] = {}
    seen: dict[str, set[str]] = {}
    answered = []
    for agent, listing in zip(agents, answers, strict=True):
        if listing is None:
            continue
        answered.append(agent.name)
        for field, value in listing.items():
            kept = merged.setdefault(field, [] if isinstance(value, list) else value)
            if not (isinstance(value, list) and isinstance(kept, list)):
                continue
            names = seen.setdefault(field, set())
            for item in value:
                name = _name(item)
                if name not in names:
                    names.add(name)
                    kept.append(item)
    if not answered:
        raise UpstreamUnavailable(
            "no workstation answered with its model list",
            headers={"Retry-After": edge.pool.retry_after},
        )
    return merged, answered


async def _listing(edge: Edge, ex: Exchange, route: Route, agent: Agent) -> dict[str, Any] | None:
    """One agent's listing, or None (logged) when it gives none in time."""
    try:
        async with edge.sessions.pooled.get(
            agent.url + route.path,
            headers={"X-Request-Id": ex.id, "Accept-Encoding": "identity"},
            timeout=agent.monitor.probe_timeout,
        ) as response:
            body = await response.read()
            if response.status != 200:
                raise ValueError(f"answered {response.status}")
            listing = orjson.loads(body)
            if not isinstance(listing, dict):
                raise ValueError("not a JSON object")
            return listing
    except (aiohttp.ClientError, TimeoutError, ValueError) as exc:
        log.warning("pool.listing_failed", agent=agent.name, route=route.path, error=repr(exc))
        return None


def _name(item: Any) -> str:
    if isinstance(item, dict):
        for field in ("id", "name", "model"):
            value = item.get(field)
            if isinstance(value, str):
                return value
    return orjson.dumps(item).decode()
