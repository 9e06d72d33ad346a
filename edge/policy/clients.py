"""Who the client is: its address as a trusted proxy names it, in one spelling, and its group.

Bans, failure counts and per-address limits key on `address_group()`: one spelling per client
(`2001:DB8::1` is `2001:db8::1`, `::ffff:203.0.113.9` is `203.0.113.9`) and an IPv6 address by
its /64, since one subscriber holds a whole /64. `ClientAddress` is the X-Forwarded-For trust
policy (docs/security.md, "Behind a proxy").
"""

from __future__ import annotations

import functools
from ipaddress import IPv4Address, IPv4Network, IPv6Address, IPv6Network, ip_address, ip_network

from aiohttp import web

# The IPv6 prefix one subscriber holds: ISPs hand out a /64 (or more) per customer, so one client
# can rotate through 2^64 addresses; bans, failure counts and per-address limits key on it.
_IPV6_GROUP_PREFIX = 64


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

    def resolve(self, request: web.Request) -> tuple[str | None, bool]:
        """The client's address (`canonical_address`, None when it is unknown), and whether
        the peer is a trusted proxy: both from one look at the peer, once per request."""
        peer = request.remote
        if peer is None:  # a Unix socket
            return None, False
        if not self.is_proxy(peer):
            return canonical_address(peer), False
        return self._forwarded(request), True

    def _forwarded(self, request: web.Request) -> str | None:
        """The client a trusted proxy names in `X-Forwarded-For` (see the class doc)."""
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


# Both are pure functions of a peer's spelling, asked on every request (and `ipaddress` parses
# in Python, ~10 µs): the addresses of the recent callers are remembered, a bounded number.
_REMEMBERED_ADDRESSES = 4096


@functools.lru_cache(maxsize=_REMEMBERED_ADDRESSES)
def canonical_address(address: str) -> str:
    """`address` in one spelling (`2001:DB8::1` is `2001:db8::1`, `::ffff:203.0.113.9` is
    `203.0.113.9`, a zone is dropped); a string that is not an IP address comes back unchanged."""
    ip = _parse(address)
    return address if ip is None else ip.compressed


@functools.lru_cache(maxsize=_REMEMBERED_ADDRESSES)
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
