"""The gauges `/metrics` reads from the live objects at scrape time (`edge.metrics`): the pool's
gate and each agent, the telemetry writer, and the edges' Redis when there is one. Read when
scraped, never stale, nothing to keep up between scrapes."""

from __future__ import annotations

import time
from collections.abc import Iterable, Iterator
from typing import TYPE_CHECKING

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from edge.telemetry import TelemetryWriter
from edge.upstreams.base import State
from edge.upstreams.pool import Pool

if TYPE_CHECKING:
    from edge.cluster.link import RedisLink


class LiveCollector(Collector):
    """Gauges read from the live pool (its gate, each agent) and telemetry writer at scrape
    time."""

    def __init__(self, pool: Pool, telemetry: TelemetryWriter) -> None:
        self._pool, self._telemetry = pool, telemetry
        self.link: RedisLink | None = None  # the edges' shared Redis, when there is one

    def describe(self) -> Iterable[Metric]:
        return ()  # the families depend on live objects; nothing to check at registration

    def collect(self) -> Iterator[Metric]:
        pool = self._pool
        agents = list(pool.agents.values())
        yield _gauge(
            "backhaul_inflight_requests", "Requests holding a GPU slot now.", pool.gate.inflight
        )
        yield _gauge(
            "backhaul_queued_requests",
            "Requests waiting for a GPU slot now (the pool's one queue).",
            pool.gate.queued,
        )
        yield _gauge(
            "backhaul_gate_slots",
            "GPU slots of the workstations connected (each BACKHAUL_EDGE_MAX_INFLIGHT, or its "
            "own).",
            sum(agent.capacity for agent in agents if agent.monitor.agent_connected),
        )
        per_agent = {
            name: GaugeMetricFamily(name, doc, labels=["agent"])
            for name, doc in (
                (
                    "backhaul_agent_connected",
                    "1 when the agent's tunnel is up (SSH presence, or the probe when unknown).",
                ),
                ("backhaul_agent_inflight_requests", "Requests holding one of its slots now."),
                ("backhaul_agent_slots", "Its GPU slots (requests at once)."),
                (
                    "backhaul_agent_tokens_per_second",
                    "Its decode-speed average over recent answers (0: no sample yet).",
                ),
                ("backhaul_agent_cooling", "1 while it cools down after failures in a row."),
                ("backhaul_upstream_state_since_seconds", "Unix time of its state's last change."),
            )
        }
        reconnects = CounterMetricFamily(
            "backhaul_agent_reconnects",
            "Times the agent's tunnel came back after its first connection.",
            labels=["agent"],
        )
        tokens = CounterMetricFamily(
            "backhaul_agent_tokens", "Tokens it generated.", labels=["agent"]
        )
        states = GaugeMetricFamily(
            "backhaul_upstream_state",
            "Each agent's model server as the edge sees it: 1 for the current state.",
            labels=["agent", "state"],
        )
        now = time.monotonic()
        for agent in agents:
            monitor, label = agent.monitor, [agent.name]
            status = monitor.status
            speed = 1.0 / agent.s_per_token if agent.s_per_token else 0.0
            for name, value in (
                ("backhaul_agent_connected", int(monitor.agent_connected)),
                ("backhaul_agent_inflight_requests", agent.inflight),
                ("backhaul_agent_slots", agent.capacity),
                ("backhaul_agent_tokens_per_second", speed),
                ("backhaul_agent_cooling", int(agent.cooling(now))),
                ("backhaul_upstream_state_since_seconds", status.since),
            ):
                per_agent[name].add_metric(label, value)
            reconnects.add_metric(label, max(0, monitor.agent_connects - 1))
            tokens.add_metric(label, agent.tokens)
            for state in State:
                states.add_metric([agent.name, state.value], int(state is status.state))
        yield from per_agent.values()
        yield reconnects
        yield tokens
        yield states
        link = self.link
        if link is not None:
            yield _gauge("backhaul_redis_up", "1 while the edges' Redis answers.", int(link.up))
            yield _gauge("backhaul_edges", "Edges sharing the Redis, as last counted.", link.edges)
            errors = CounterMetricFamily(
                "backhaul_redis_errors", "Calls to Redis that failed or passed the timeout."
            )
            errors.add_metric([], link.errors)
            yield errors
        telemetry = self._telemetry
        lines = CounterMetricFamily(
            "backhaul_telemetry_lines",
            "JSONL telemetry lines, by result: written, or dropped on a failing disk.",
            labels=["result"],
        )
        lines.add_metric(["written"], telemetry.written)
        lines.add_metric(["dropped"], telemetry.dropped)
        yield lines


def _gauge(name: str, documentation: str, value: float) -> GaugeMetricFamily:
    return GaugeMetricFamily(name, documentation, value=value)
