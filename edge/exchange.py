"""One request's context as it crosses the edge: its id, client, timing and telemetry record.

The outermost middleware (`edge.app`) creates the `Exchange`, every later step fills in the
record, and the middleware writes it once, whatever happened.
"""

from __future__ import annotations

import re
import secrets
import time
from dataclasses import dataclass, field
from ipaddress import IPv4Address, IPv4Network, IPv6Address, IPv6Network, ip_address, ip_network

from aiohttp import web

from edge.policy.keys import ApiKey
from edge.record import RequestRecord
from edge.routes import Route

_REQUEST_ID = re.compile(r"[A-Za-z0-9._:-]{1,128}")
# The IPv6 prefix one subscriber holds: ISPs hand out a /64 (or more) per customer, so one client
# can rotate through 2^64 addresses; bans, failure counts and per-address limits key on it.
_IPV6_GROUP_PREFIX = 64


@dataclass(slots=True)
class Exchange:
    path: str  # the raw path, as the client wrote it
    record: RequestRecord  # carries the request id, `record.id`
    start: float = field(default_factory=time.perf_counter)
    route: Route | None = None
    headers_sent: bool = False
    upstream_s: float = 0.0  # seconds spent waiting on the upstream, for overhead_ms
    key: ApiKey | None = None  # the caller's API key once authenticated (edge.policy.guard)
    rate_headers: dict[str, str] | None = None  # RateLimit-* for the response (edge.policy.guard)
    via_proxy: bool = False  # the peer is a trusted proxy: it is not the client (ClientAddress)
    # Counted in an aggregate instead of a telemetry line (edge.policy.guard).
    aggregated: bool = False

    @property
    def id(self) -> str:
        return self.record.id

    def elapsed_ms(self) -> float:
        return (time.perf_counter() - self.start) * 1000.0

    def overhead_ms(self) -> float:
        """Time the edge itself spent: everything but the wait on the upstream."""
        return max(0.0, self.elapsed_ms() - self.upstream_s * 1000.0)


EXCHANGE = web.RequestKey("exchange", Exchange)


def request_id(supplied: str | None) -> str:
    """The caller's `X-Request-Id` when it is a sane token, else a new one."""
    if supplied and _REQUEST_ID.fullmatch(supplied):
        return supplied
    return secrets.token_hex(16)  # 128 random bits, as a UUID4 has, for a fifth of the cost


class ClientAddress:
    """The client's address: the peer, or what a trusted proxy says in `X-Forwarded-For`.

    A peer outside `trusted` is the client, whatever headers it sends. A trusted proxy's
    request names its client in `X-Forwarded-For`: the rightmost address there that is not
    itself a trusted proxy is the one a client cannot forge (each proxy appends the address it
    saw; a client can only write to the left of it). When a trusted proxy names no usable
    address (no header, or the rightmost untrusted entry is not an IP address) the client is
    unknown (None), never the proxy's own address: every client shares that one, so bans and
    per-address limits keyed on it would hit them all (`edge.policy.guard` refuses such a request).
    """

    def __init__(self, trusted: list[str]) -> None:
        self._trusted: list[IPv4Network | IPv6Network] = [
            ip_network(net, strict=False) for net in trusted
        ]

    def is_proxy(self, address: str | None) -> bool:
        """Whether `address` (a peer or a forwarded hop) is one of the trusted proxies."""
        if not self._trusted or address is None:
            return False
        ip = _parse(address)
        return ip is not None and any(ip in net for net in self._trusted)

    def of(self, request: web.Request) -> str | None:
        """The client's address (`canonical_address`), or None when it is unknown."""
        peer = request.remote
        if peer is None:  # a Unix socket
            return None
        if not self.is_proxy(peer):
            return canonical_address(peer)
        forwarded = request.headers.getall("X-Forwarded-For", [])
        hops = [hop.strip() for value in forwarded for hop in value.split(",") if hop.strip()]
        for hop in reversed(hops):
            if not self.is_proxy(hop):
                return canonical_address(hop) if _parse(hop) is not None else None
        # Every hop is a trusted proxy (a tool on the proxy's own host went through it): the
        # leftmost is the first one, the client.
        return canonical_address(hops[0]) if hops else None


def _parse(address: str) -> IPv4Address | IPv6Address | None:
    """The IP address `address` spells, an IPv4-mapped IPv6 address as IPv4, without its zone."""
    try:
        ip = ip_address(address.strip())
    except ValueError:
        return None
    if isinstance(ip, IPv6Address):
        if ip.ipv4_mapped is not None:
            return ip.ipv4_mapped
        if ip.scope_id is not None:
            return IPv6Address(int(ip))
    return ip


def canonical_address(address: str) -> str:
    """`address` in one spelling (`2001:DB8::1` is `2001:db8::1`, `::ffff:203.0.113.9` is
    `203.0.113.9`, a zone is dropped); a string that is not an IP address comes back unchanged."""
    ip = _parse(address)
    return address if ip is None else ip.compressed


def address_group(address: str) -> str:
    """What bans, failure counts and per-address limits key on: an IPv4 address itself
    (IPv4-mapped IPv6 too), an IPv6 address's /64 (`2001:db8::/64`), since one subscriber holds
    a whole /64. A string that is not an IP address comes back unchanged."""
    ip = _parse(address)
    if ip is None:
        return address
    if isinstance(ip, IPv4Address):
        return ip.compressed
    prefix = _IPV6_GROUP_PREFIX
    return IPv6Network((int(ip) >> (128 - prefix) << (128 - prefix), prefix)).compressed
