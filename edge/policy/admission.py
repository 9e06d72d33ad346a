"""Who may open a connection to the edge's listeners, decided at accept (docs/security.md,
"Connection limits").

An anonymous client must not be able to take the edge down by holding connections open: every
descriptor it holds is one the tunnel, the model server's connections and the other clients do
not get. `Admission` counts one listener's open connections, in total and per client address
(`edge.exchange.address_group`: an IPv4 address, IPv4-mapped IPv6 as IPv4, an IPv6 address's
/64), and refuses past its caps. For the SSH port it also caps connections that have not yet
authenticated (sshd's `MaxStartups`, random early drop) and the rate of handshakes one address
may start (a token bucket), because each key exchange costs about 2 ms of the event loop's CPU.

`guarded(factory, admission)` wraps the protocol factory the event loop calls on accept: a
refused connection is aborted in `connection_made`, before aiohttp parses a byte or asyncssh
builds its connection (so before any crypto), and costs no log line of its own: refusals are
counted (`backhaul_connections_refused_total`) and summed up in at most one
`edge.connections_refused` event per listener every `_LOG_WINDOW_S`. `GuardedSite` is aiohttp's
TCP site with that wrapper. `raise_fd_limit()` lifts the process's soft descriptor limit to its
hard one at start, as nginx's `worker_rlimit_nofile` does; the HTTP total cap is derived from it.

Trusted proxies (`trusted_proxies`) are exempt from the per-address cap (all of a proxy's
clients arrive from its address), not from the total.
"""

from __future__ import annotations

import asyncio
import random
import resource
import time
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any, cast

import structlog
from aiohttp import web
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from edge.policy.clients import ClientAddress, address_group
from edge.settings import EdgeSettings

log = structlog.get_logger(__name__)

# Seconds between two `edge.connections_refused` events of one listener: a flood of refusals
# is one line per window with its count, never a line per connection.
_LOG_WINDOW_S = 10.0
# The highest soft descriptor limit asked for when the hard limit is unlimited (Linux's default
# fs.nr_open is 2^20; asking for more fails).
_NOFILE_CEILING = 1 << 20
# Descriptors kept back from client connections: listening sockets, the telemetry and log files,
# the keys and bans files, the probe, asyncio's self-pipe, and slack.
_FD_RESERVE = 128
# Each client connection may hold two more descriptors behind it while its request is in
# flight: the edge's connection to the tunnel and, in embedded mode, the forward's own socket.
_FDS_PER_CLIENT = 3
# Never derive a total cap below this, whatever the descriptor limit says.
_MIN_TOTAL = 64
# Addresses whose handshake bucket is remembered; the oldest is forgotten past this (a forgotten
# bucket is a full one: an address spray can only reset buckets, never grow memory).
_MAX_BUCKETS = 10_000


def raise_fd_limit() -> int:
    """Raise the soft RLIMIT_NOFILE to the hard limit (as nginx's `worker_rlimit_nofile`);
    return the soft limit now in force. A limit the kernel refuses leaves it as it was."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = _NOFILE_CEILING if hard == resource.RLIM_INFINITY else hard
    if soft != resource.RLIM_INFINITY and soft < target:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
        except (ValueError, OSError):
            return soft
        return target
    return soft


def fd_limit() -> int:
    soft, _hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    return _NOFILE_CEILING if soft == resource.RLIM_INFINITY else soft


def derived_total(nofile: int, reserved: int) -> int:
    """The HTTP total cap when `max_connections` is 0: what the descriptor limit leaves after
    `_FD_RESERVE` and `reserved` (the SSH listener's own cap), `_FDS_PER_CLIENT` each."""
    return max(_MIN_TOTAL, (nofile - _FD_RESERVE - reserved) // _FDS_PER_CLIENT)


@dataclass(frozen=True)
class MaxStartups:
    """sshd's `MaxStartups start:rate:full`: past `start` unauthenticated connections, refuse a
    new one with probability `rate`%, rising linearly to 100% at `full`."""

    start: int
    rate: int
    full: int

    @classmethod
    def parse(cls, text: str) -> MaxStartups:
        parts = [int(p) for p in text.split(":")]
        if len(parts) == 1:
            return cls(parts[0], 100, parts[0])
        start, rate, full = parts
        return cls(start, rate, full)

    def refuses(self, unauthenticated: int, draw: float) -> bool:
        """Whether to refuse, with `unauthenticated` open now and `draw` uniform in [0, 1)."""
        if unauthenticated >= self.full:
            return True
        if unauthenticated < self.start:
            return False
        span = self.full - self.start
        chance = self.rate + (100 - self.rate) * (unauthenticated - self.start) / span
        return draw * 100 < chance


@dataclass
class _Bucket:
    tokens: float
    at: float


@dataclass
class HandshakeRate:
    """A token bucket per address: `burst` handshakes at once, then `per_s` a second."""

    per_s: float
    burst: int
    clock: Callable[[], float] = time.monotonic
    _buckets: dict[str, _Bucket] = field(default_factory=dict)

    def take(self, group: str) -> bool:
        now = self.clock()
        bucket = self._buckets.pop(group, None)
        if bucket is None:
            bucket = _Bucket(float(self.burst), now)
        else:
            bucket.tokens = min(self.burst, bucket.tokens + (now - bucket.at) * self.per_s)
            bucket.at = now
        self._buckets[group] = bucket  # re-inserted: the dict's order is least recent first
        if len(self._buckets) > _MAX_BUCKETS:
            del self._buckets[next(iter(self._buckets))]
        if bucket.tokens < 1.0:
            return False
        bucket.tokens -= 1.0
        return True


@dataclass(eq=False, slots=True)
class Ticket:
    """One admitted connection: its address group, and whether it has authenticated (SSH)."""

    group: str
    capped: bool  # counted against the per-address cap (not a trusted proxy)
    authenticated: bool = False


class Admission:
    """One listener's caps and counts; see the module doc."""

    def __init__(
        self,
        listener: str,
        *,
        total: int,
        per_address: int,
        trusted: list[str] | None = None,
        startups: MaxStartups | None = None,
        handshakes: HandshakeRate | None = None,
        per_address_until_authenticated: bool = False,
        draw: Callable[[], float] = random.random,
    ) -> None:
        self.listener = listener
        self.total = total
        self.per_address = per_address
        self._trusted = ClientAddress(trusted or [])
        self._startups = startups
        self._handshakes = handshakes
        # SSH: the per-address cap counts connections that have not logged in (sshd's
        # PerSourceMaxStartups); an agent holding a key is not anonymous.
        self._until_authenticated = per_address_until_authenticated
        self._draw = draw
        self.open = 0
        self.unauthenticated = 0
        self._by_group: dict[str, int] = {}
        self._tickets: dict[tuple[str, int], Ticket] = {}
        self._released = asyncio.Event()
        self.refused: Counter[str] = Counter()
        self.reasons: tuple[str, ...] = ("total", "per_address")
        if startups is not None:
            self.reasons += ("startups",)
        if handshakes is not None:
            self.reasons += ("handshake_rate",)
        self._report = _RefusalReport(listener)

    def admit(self, peer: Any) -> Ticket | None:
        """A ticket for a new connection from `peer` (a socket address), or None: refuse it."""
        host = str(peer[0]) if peer else ""
        group = address_group(host)
        capped = not self._trusted.is_proxy(host)
        reason = self._refusal(group, capped)
        if reason is not None:
            self.refused[reason] += 1
            self._report.refused(reason, group)
            return None
        ticket = Ticket(group, capped)
        self.open += 1
        self.unauthenticated += 1
        if capped:
            self._by_group[group] = self._by_group.get(group, 0) + 1
        if peer:
            self._tickets[(host, peer[1])] = ticket
        return ticket

    def _refusal(self, group: str, capped: bool) -> str | None:
        if self.open >= self.total:
            return "total"
        if capped and self._by_group.get(group, 0) >= self.per_address:
            return "per_address"
        if self._startups is not None and self._startups.refuses(
            self.unauthenticated, self._draw()
        ):
            return "startups"
        if self._handshakes is not None and not self._handshakes.take(group):
            return "handshake_rate"
        return None

    def ticket(self, peer: Any) -> Ticket | None:
        """The ticket of the open connection from `peer` (the SSH server marks it logged in)."""
        return self._tickets.get((str(peer[0]), peer[1])) if peer else None

    def authenticated(self, ticket: Ticket) -> None:
        if not ticket.authenticated:
            ticket.authenticated = True
            self.unauthenticated -= 1
            if self._until_authenticated and ticket.capped:
                self._uncount(ticket.group)
                ticket.capped = False

    def release(self, ticket: Ticket, peer: Any) -> None:
        self.open -= 1
        if not ticket.authenticated:
            self.unauthenticated -= 1
        if ticket.capped:
            self._uncount(ticket.group)
        if peer:
            self._tickets.pop((str(peer[0]), peer[1]), None)
        self._released.set()

    async def wait_open(self, at_most: int) -> None:
        """Return once at most `at_most` connections are open (all of them, or, on the SSH
        port, the unauthenticated ones when `startups` caps them)."""
        while (self.unauthenticated if self._startups else self.open) > at_most:
            self._released.clear()
            await self._released.wait()

    def _uncount(self, group: str) -> None:
        left = self._by_group[group] - 1
        if left:
            self._by_group[group] = left
        else:
            del self._by_group[group]

    def close(self) -> None:
        self._report.close()


class _RefusalReport:
    """At most one `edge.connections_refused` event per `_LOG_WINDOW_S`: the first refusal after
    a quiet window at once, then the window's count when it ends."""

    def __init__(self, listener: str) -> None:
        self._listener = listener
        self._pending: Counter[str] = Counter()
        self._last_group = ""
        self._timer: asyncio.TimerHandle | None = None

    def refused(self, reason: str, group: str) -> None:
        self._last_group = group
        if self._timer is None:
            self._emit(Counter({reason: 1}))
        else:
            self._pending[reason] += 1

    def _emit(self, counts: Counter[str]) -> None:
        log.warning(
            "edge.connections_refused",
            listener=self._listener,
            refused=sum(counts.values()),
            reasons=dict(counts),
            last_address=self._last_group,
            window_s=_LOG_WINDOW_S,
        )
        self._timer = asyncio.get_running_loop().call_later(_LOG_WINDOW_S, self._window_end)

    def _window_end(self) -> None:
        self._timer = None
        if self._pending:
            counts, self._pending = self._pending, Counter()
            self._emit(counts)

    def close(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None


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


def http_admission(settings: EdgeSettings) -> Admission:
    """The HTTP port's caps: `max_connections` (0: derived from the descriptor limit, after
    what the SSH listener may hold) and `max_connections_per_address`."""
    ssh = settings.ssh_max_connections if settings.ssh_port else 0
    total = settings.max_connections or derived_total(fd_limit(), ssh)
    return Admission(
        "http",
        total=total,
        per_address=settings.max_connections_per_address,
        trusted=settings.trusted_proxies,
    )


def ssh_admission(settings: EdgeSettings) -> Admission:
    """The embedded SSH server's caps (no proxy stands in front of it: no one is exempt)."""
    return Admission(
        "ssh",
        total=settings.ssh_max_connections,
        per_address=settings.ssh_max_startups_per_address,
        per_address_until_authenticated=True,
        startups=MaxStartups.parse(settings.ssh_max_startups),
        handshakes=HandshakeRate(settings.ssh_handshake_rate, settings.ssh_handshake_burst),
    )
