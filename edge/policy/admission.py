"""Who may open a connection to the edge's listeners, decided at accept (docs/security.md,
"Connection limits").

An anonymous client must not be able to take the edge down by holding connections open: every
descriptor it holds is one the tunnel, the model server's connections and the other clients do
not get. `Admission` counts one listener's open connections, in total and per client address
(`edge.exchange.address_group`: an IPv4 address, IPv4-mapped IPv6 as IPv4, an IPv6 address's
/64), and refuses past its caps. For the SSH port it also caps connections that have not yet
authenticated (sshd's `MaxStartups`, random early drop) and the rate of handshakes one address
may start (a token bucket), because each key exchange costs about 2 ms of the event loop's CPU.

`edge.policy.listeners.guarded(factory, admission)` wraps the protocol factory the event loop
calls on accept: a refused connection is aborted in `connection_made`, before aiohttp parses a
byte or asyncssh builds its connection (so before any crypto), and costs no log line of its own:
refusals are counted (`backhaul_connections_refused_total`) and summed up in at most one
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
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import structlog

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
