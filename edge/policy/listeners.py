"""The listeners' side of admission: the protocol wrapper that admits or aborts a connection at
accept, aiohttp's TCP site with it, and the listeners' metrics.

`guarded(factory, admission)` wraps the protocol factory the event loop calls on accept: a
refused connection is aborted in `connection_made`, before aiohttp parses a byte or asyncssh
builds its connection (so before any crypto). The caps themselves are `edge.policy.admission`.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any, cast

from aiohttp import web
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from edge.policy.admission import Admission, Ticket


class _Guarded(asyncio.Protocol):
    """The protocol the loop sees: admit or abort at once, then hand every event to the real
    protocol (aiohttp's request handler, asyncssh's connection)."""

    __slots__ = ("_admission", "_factory", "_inner", "_peer", "_ticket")

    def __init__(self, factory: Callable[[], asyncio.BaseProtocol], admission: Admission) -> None:
        self._factory = factory
        self._admission = admission
        self._inner: Any = None
        self._ticket: Ticket | None = None
        self._peer: Any = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._peer = transport.get_extra_info("peername")
        self._ticket = self._admission.admit(self._peer)
        if self._ticket is None:
            cast(
                asyncio.Transport, transport
            ).abort()  # nothing read, nothing written, nothing logged
            return
        self._inner = self._factory()
        self._inner.connection_made(transport)

    def data_received(self, data: bytes) -> None:
        self._inner.data_received(data)

    def eof_received(self) -> bool | None:
        return self._inner.eof_received() if self._inner is not None else None

    def pause_writing(self) -> None:
        if self._inner is not None:
            self._inner.pause_writing()

    def resume_writing(self) -> None:
        if self._inner is not None:
            self._inner.resume_writing()

    def connection_lost(self, exc: Exception | None) -> None:
        if self._ticket is not None:
            self._admission.release(self._ticket, self._peer)
            self._ticket = None
        if self._inner is not None:
            self._inner.connection_lost(exc)


def guarded(
    factory: Callable[[], asyncio.BaseProtocol], admission: Admission
) -> Callable[[], asyncio.Protocol]:
    """The protocol factory to give `loop.create_server`: `factory`'s, behind `admission`."""
    return lambda: _Guarded(factory, admission)


# Connections the kernel may queue for accept: the loop accepts up to this many per wake-up, so
# a burst of a flood is drained (and refused) in one pass and a client behind it is not stuck
# in a full queue. Linux caps it at net.core.somaxconn (4096 by default since 5.4).
_BACKLOG = 1024


class GuardedSite(web.BaseSite):
    """aiohttp's TCP site, with every accepted connection passed through `admission` first."""

    __slots__ = ("_admission", "_host", "_port")

    def __init__(self, runner: web.BaseRunner, host: str, port: int, admission: Admission) -> None:
        super().__init__(runner, backlog=_BACKLOG)
        self._host, self._port, self._admission = host, port, admission

    @property
    def name(self) -> str:
        port = self._port
        sockets = getattr(self._server, "sockets", None)  # uvloop's Server is no asyncio.Server
        if sockets:
            port = sockets[0].getsockname()[1]
        host = f"[{self._host}]" if ":" in self._host else self._host
        return f"http://{host}:{port}"

    async def start(self) -> None:
        await super().start()
        server = self._runner.server
        assert server is not None, "runner.setup() first"
        self._server = await asyncio.get_running_loop().create_server(
            guarded(server, self._admission), self._host, self._port, backlog=self._backlog
        )

    async def stop(self) -> None:
        await super().stop()
        self._admission.close()


@dataclass
class Listeners:
    """The edge's admissions (HTTP, and SSH when embedded), and their metrics."""

    http: Admission
    others: list[Admission] = field(default_factory=list)

    def all(self) -> Iterator[Admission]:
        yield self.http
        yield from self.others


class ListenersCollector(Collector):
    """Open connections, caps and refusals per listener, read at scrape time."""

    def __init__(self, listeners: Listeners) -> None:
        self._listeners = listeners

    def describe(self) -> Iterable[Metric]:
        return ()

    def collect(self) -> Iterator[Metric]:
        open_ = GaugeMetricFamily(
            "backhaul_connections_open",
            "Open client connections, by listener.",
            labels=["listener"],
        )
        caps = GaugeMetricFamily(
            "backhaul_connections_limit",
            "Most client connections a listener admits in total.",
            labels=["listener"],
        )
        pre_auth = GaugeMetricFamily(
            "backhaul_connections_unauthenticated",
            "Open SSH connections that have not yet authenticated.",
            labels=["listener"],
        )
        refused = CounterMetricFamily(
            "backhaul_connections_refused",
            "Connections closed at accept, by listener and cap: total, per_address, startups "
            "(unauthenticated SSH connections), handshake_rate (SSH handshakes per address).",
            labels=["listener", "reason"],
        )
        for admission in self._listeners.all():
            name = admission.listener
            open_.add_metric([name], admission.open)
            caps.add_metric([name], admission.total)
            if "startups" in admission.reasons:
                pre_auth.add_metric([name], admission.unauthenticated)
            for reason in admission.reasons:
                refused.add_metric([name, reason], admission.refused[reason])
        yield from (open_, caps, pre_auth, refused)
