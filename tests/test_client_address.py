"""The client address: one spelling per address, one group per IPv6 /64, and whom to believe."""

from __future__ import annotations

from pathlib import Path

import aiohttp
import pytest

from edge.policy.clients import address_group, canonical_address
from tests.support.keyfiles import bearer, captured_logs, keyed, reached, write_keys
from tests.support.servers import edge, simulator


@pytest.mark.parametrize(
    ("address", "canonical", "group"),
    [
        ("203.0.113.9", "203.0.113.9", "203.0.113.9"),
        ("::ffff:203.0.113.9", "203.0.113.9", "203.0.113.9"),  # IPv4-mapped: the same client
        ("2001:DB8::1", "2001:db8::1", "2001:db8::/64"),
        ("2001:db8:0:0:ffff::9", "2001:db8::ffff:0:0:9", "2001:db8::/64"),  # same /64
        ("2001:db8:0:1::1", "2001:db8:0:1::1", "2001:db8:0:1::/64"),  # the next /64
        ("fe80::1%eth0", "fe80::1", "fe80::/64"),  # a zone is no part of the address
        (" 198.51.100.7 ", "198.51.100.7", "198.51.100.7"),
        ("unix:", "unix:", "unix:"),  # not an IP address: unchanged
    ],
)
def test_addresses_have_one_spelling_and_ipv6_groups_by_64(
    address: str, canonical: str, group: str
) -> None:
    assert canonical_address(address) == canonical
    assert address_group(address) == group


GEN = {"model": "llama3.2:1b", "prompt": "why", "stream": False}
PROXIED = {"trusted_proxies": ["127.0.0.1/32"]}


@pytest.mark.parametrize(
    ("forwarded", "client"),
    [
        (["198.51.100.7"], "198.51.100.7"),
        # A client can write only to the left of what our proxy appended.
        (["203.0.113.66, 198.51.100.7"], "198.51.100.7"),
        (["203.0.113.66", "198.51.100.7"], "198.51.100.7"),  # two headers are one list
        (["198.51.100.7, 127.0.0.1"], "198.51.100.7"),  # a trusted hop is skipped
        (["::ffff:198.51.100.7"], "198.51.100.7"),
        (["2001:DB8::1"], "2001:db8::1"),
        (["127.0.0.1"], "127.0.0.1"),  # a tool on the proxy's host, through the proxy
    ],
)
async def test_a_trusted_proxy_names_the_client(
    tmp_path: Path, http: aiohttp.ClientSession, forwarded: list[str], client: str
):
    async with simulator() as sim, edge(sim.url, tmp_path, **PROXIED) as e:
        headers = [("X-Forwarded-For", value) for value in forwarded]
        headers.append(("X-Request-Id", "r1"))
        async with http.post(f"{e.url}/api/generate", json=GEN, headers=headers) as r:
            assert r.status == 200
        assert (await e.record("r1"))["client"] == client


async def test_anyone_else_is_its_own_peer_whatever_it_claims(
    tmp_path: Path, http: aiohttp.ClientSession
):
    only_elsewhere = {"trusted_proxies": ["192.0.2.0/24"]}
    async with simulator() as sim, edge(sim.url, tmp_path, **only_elsewhere) as e:
        headers = {"X-Forwarded-For": "198.51.100.7", "X-Request-Id": "r1"}
        async with http.post(f"{e.url}/api/generate", json=GEN, headers=headers) as r:
            assert r.status == 200
        assert (await e.record("r1"))["client"] == "127.0.0.1"


@pytest.mark.parametrize("forwarded", [None, "unknown", "198.51.100.7:4711", "203.0.113.9, x"])
async def test_a_proxy_that_names_no_client_is_refused_not_taken_for_everyone(
    tmp_path: Path, http: aiohttp.ClientSession, forwarded: str | None
):
    """Were the proxy's own address the client, 10 bad keys from anyone would ban everyone
    behind it; the request is refused instead, loudly, and counts towards nothing."""
    secrets = write_keys(tmp_path / "keys.json", real={})
    settings = keyed(tmp_path, ban_threshold=3, **PROXIED)
    unnamed = {"X-Forwarded-For": forwarded} if forwarded is not None else {}
    with captured_logs() as logs:
        async with simulator() as sim, edge(sim.url, tmp_path, **settings) as e:
            for i in range(5):
                headers = {**unnamed, **bearer(f"bh_{i:043d}"), "X-Request-Id": f"g{i}"}
                async with http.post(f"{e.url}/api/generate", json=GEN, headers=headers) as r:
                    assert r.status == 400
                    body = await r.json()
                    assert body["type"] == "unknown_client", body
                record = await e.record(f"g{i}")
                assert record["client"] is None and record["type"] == "unknown_client"
            # Probes still answer (a monitor on the proxy's host calls them directly).
            async with http.get(f"{e.url}/healthz", headers=unnamed) as r:
                assert r.status == 200
            # Nobody was banned: a client the proxy names is served.
            named = {**bearer(secrets["real"]), "X-Forwarded-For": "198.51.100.7"}
            async with http.post(f"{e.url}/api/generate", json=GEN, headers=named) as r:
                assert r.status == 200
            assert len(e.edge.guard.bans) == 0
            assert reached(sim) == ["/api/generate"]
    events = [x["event"] for x in logs]
    assert events.count("auth.unknown_client") == 1  # once a minute, not once a request
    assert "auth.failed" not in events and "auth.banned" not in events
