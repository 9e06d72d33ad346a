"""`TunnelUpstream`: the agent's model server, reached through the tunnel's loopback end.

It bundles what belongs to one GPU: the base URL the edge sends to, the monitor that knows
whether anything answers there, and the gate that shares its slots. The request path asks it
for a refusal before waiting on anything, takes a slot from its gate, sends through the edge's
sessions and translates what went wrong with `errors()`. Several of these behind a router (and a
cloud upstream beside them) is how the edge grows past one workstation (DESIGN.md §7.2).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import aiohttp

from edge.errors import UpstreamTimeout, UpstreamUnavailable
from edge.upstreams.base import State, classify
from edge.upstreams.gate import Gate
from edge.upstreams.monitor import UpstreamMonitor


@dataclass(frozen=True, slots=True, eq=False)
class TunnelUpstream:
    name: str  # in the telemetry line's `upstream` field
    url: str  # base URL of the tunnel's loopback end, `http://127.0.0.1:11434`
    monitor: UpstreamMonitor
    gate: Gate

    @contextmanager
    def errors(self) -> Iterator[None]:
        """Translate aiohttp client failures before response headers into our errors, with the
        state each shows (`classify`, the probe's own table) reported to the monitor."""
        monitor = self.monitor
        try:
            yield
        except (aiohttp.ClientConnectorError, aiohttp.ConnectionTimeoutError) as exc:
            state, reason = classify(exc) or (State.AGENT_ABSENT, str(exc))
            monitor.report(state, f"request: {reason}")
            refusal = monitor.refusal()  # AgentUnavailable now, worded in one place
            assert refusal is not None
            raise refusal from exc
        except TimeoutError as exc:  # the read timeout, or the monitor woke us: tunnel is down
            refusal = monitor.refusal()
            if refusal is not None:
                raise refusal from exc
            raise UpstreamTimeout("the model server did not answer in time") from exc
        except aiohttp.ClientError as exc:  # accepted, then reset: the agent's model server is down
            state, reason = classify(exc) or (State.MODEL_SERVER_DOWN, str(exc))
            monitor.report(state, f"request: {reason}")  # not a refusal: the probe looks again
            raise UpstreamUnavailable(
                "the workstation is connected but its model server did not answer",
                headers={"Retry-After": monitor.retry_after},
            ) from exc
