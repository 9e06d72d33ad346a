"""The agent's optional Prometheus port on loopback (`BACKHAUL_AGENT_METRICS_PORT`; 0 = off).

`status.json` and `backhaul-agent status` answer "is it up, and if not why" for a person; a
Prometheus on the workstation (or a node exporter's textfile scrape, or an SSH-forwarded scrape
from the VPS) wants the same facts as series to graph and alert on. This serves them, read from
the agent's one `AgentStatus` at scrape time, so it cannot disagree with the status file. It
listens on 127.0.0.1 only: nothing on the workstation listens on a public interface
(DESIGN.md §1), so there is no address setting and no token.

The unlabelled tunnel series are the first edge's, as in `status.json`; the
`backhaul_agent_edge_*` families carry every edge's own connection, labelled `edge="host:port"`
(one series per edge, the first included), for an agent with `extra_edges`.

Resource handling: `metrics_server()` owns its aiohttp runner; `run_metrics()` serves until it
is cancelled, as one task in the agent's task group.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager

from aiohttp import hdrs, web
from prometheus_client import CollectorRegistry
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.exposition import choose_encoder
from prometheus_client.registry import Collector

from agent.status import EdgeStatus, StatusBoard

HOST = "127.0.0.1"


class _StatusCollector(Collector):
    """`AgentStatus` as Prometheus families, built at each scrape."""

    def __init__(self, board: StatusBoard) -> None:
        self._board = board

    def collect(self) -> Iterator[Metric]:
        s = self._board.status
        yield GaugeMetricFamily(
            "backhaul_agent_connected",
            "1 while the SSH connection and its reverse forward are up.",
            value=int(s.connected),
        )
        yield CounterMetricFamily(
            "backhaul_agent_connects", "Successful connections since start.", value=s.connects
        )
        yield CounterMetricFamily(
            "backhaul_agent_reconnects", "Connections after the first one.", value=s.reconnects
        )
        yield GaugeMetricFamily(
            "backhaul_agent_start_time_seconds", "Unix time the agent started.", value=s.started
        )
        if s.connected_since is not None:
            yield GaugeMetricFamily(
                "backhaul_agent_connected_since_seconds",
                "Unix time the current connection came up.",
                value=s.connected_since,
            )
        if s.last_disconnect is not None:
            yield GaugeMetricFamily(
                "backhaul_agent_last_disconnect_seconds",
                "Unix time of the last disconnect.",
                value=s.last_disconnect,
            )
        if s.last_disconnect_reason:
            info = GaugeMetricFamily(
                "backhaul_agent_last_disconnect_info",
                "The last disconnect's reason, as a label (1 series: the latest).",
                labels=["reason"],
            )
            info.add_metric([s.last_disconnect_reason], 1)
            yield info
        if s.last_error and not s.connected:
            error = GaugeMetricFamily(
                "backhaul_agent_error_info",
                "Why the agent is not connected: transient (retrying) or permanent (fix needed).",
                labels=["kind", "error"],
            )
            error.add_metric([s.last_error_kind or "", s.last_error], 1)
            yield error
        if s.upstream_up is not None:  # not probed yet: no sample rather than a false 0
            yield GaugeMetricFamily(
                "backhaul_agent_upstream_up",
                "1 when the local model server answers its probe.",
                value=int(s.upstream_up),
            )
        if s.warm_models:
            warm = GaugeMetricFamily(
                "backhaul_agent_model_warm",
                "1 for each configured warm model that is loaded.",
                labels=["model"],
            )
            for model in s.warm_models:
                warm.add_metric([model], int(model in s.warmed))
            yield warm
        yield from _edge_families(s.edges)


def _edge_families(edges: list[EdgeStatus]) -> Iterator[Metric]:
    """Each edge's connection, labelled by its host:port."""
    if not edges:
        return
    connected = GaugeMetricFamily(
        "backhaul_agent_edge_connected",
        "1 while this edge's SSH connection and reverse forward are up.",
        labels=["edge"],
    )
    connects = CounterMetricFamily(
        "backhaul_agent_edge_connects", "Successful connections to this edge.", labels=["edge"]
    )
    reconnects = CounterMetricFamily(
        "backhaul_agent_edge_reconnects",
        "Connections to this edge after the first one.",
        labels=["edge"],
    )
    since = GaugeMetricFamily(
        "backhaul_agent_edge_connected_since_seconds",
        "Unix time this edge's current connection came up.",
        labels=["edge"],
    )
    dropped = GaugeMetricFamily(
        "backhaul_agent_edge_last_disconnect_seconds",
        "Unix time of this edge's last disconnect.",
        labels=["edge"],
    )
    error = GaugeMetricFamily(
        "backhaul_agent_edge_error_info",
        "Why this edge is not connected: transient (retrying) or permanent (fix needed).",
        labels=["edge", "kind", "error"],
    )
    for e in edges:
        connected.add_metric([e.edge], int(e.connected))
        connects.add_metric([e.edge], e.connects)
        reconnects.add_metric([e.edge], e.reconnects)
        if e.connected_since is not None:
            since.add_metric([e.edge], e.connected_since)
        if e.last_disconnect is not None:
            dropped.add_metric([e.edge], e.last_disconnect)
        if e.last_error and not e.connected:
            error.add_metric([e.edge, e.last_error_kind or "", e.last_error], 1)
    yield from (connected, connects, reconnects, since, dropped, error)


def create_metrics_app(board: StatusBoard) -> web.Application:
    """An app answering `GET /metrics` from `board`."""
    registry = CollectorRegistry()
    registry.register(_StatusCollector(board))

    async def metrics(request: web.Request) -> web.Response:
        encoder, content_type = choose_encoder(request.headers.get(hdrs.ACCEPT, ""))
        return web.Response(
            body=encoder(registry),
            headers={hdrs.CONTENT_TYPE: content_type, hdrs.CACHE_CONTROL: "no-store"},
        )

    app = web.Application()
    app.router.add_get("/metrics", metrics)
    return app


@asynccontextmanager
async def metrics_server(board: StatusBoard, port: int) -> AsyncIterator[int]:
    """Serve `/metrics` on 127.0.0.1:`port` (0: any free port); yield the bound port."""
    runner = web.AppRunner(create_metrics_app(board), access_log=None)
    await runner.setup()
    try:
        await web.TCPSite(runner, HOST, port).start()
        bound: int = runner.addresses[0][1]
        yield bound
    finally:
        await runner.cleanup()


async def run_metrics(board: StatusBoard, port: int) -> None:
    """Serve until cancelled (the agent's task group does it at SIGTERM)."""
    async with metrics_server(board, port):
        await asyncio.Event().wait()
