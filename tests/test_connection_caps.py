"""Connection caps on the HTTP port (edge.policy.admission): refused at accept, per address and in
total, trusted proxies exempt from the first, every refusal counted, logged once per window.

The edge runs as `serve()` runs it (`GuardedSite` over the real `create_app`); the attacker
connects from 127.0.0.2, the normal client from 127.0.0.1.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
from aiohttp import web
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from edge.app import create_app
from edge.policy.admission import Admission, HandshakeRate, MaxStartups, derived_total
from edge.policy.listeners import GuardedSite
from edge.services import Edge, open_edge
from edge.settings import EdgeSettings
from tests.support.flood import ATTACKER, close_all, connect, http_status, refused
from tests.support.keyfiles import Clock, captured_logs
from tests.support.servers import free_port


@dataclass
class Guarded:
    edge: Edge
    port: int

    @property
    def http(self) -> Admission:
        return self.edge.listeners.http


@asynccontextmanager
async def guarded_edge(tmp_path: Path, **settings: Any) -> AsyncIterator[Guarded]:
    """The edge on 127.0.0.1 port 0 behind its admission, as `edge.serve.serve` starts it."""
    config = EdgeSettings(
        upstream=f"http://127.0.0.1:{free_port()}",
        auth="none",
        telemetry_path=tmp_path / "telemetry.jsonl",
        keys_path=tmp_path / "keys.json",
        bans_path=tmp_path / "bans.json",
        **settings,
    )
    async with open_edge(config) as edge:
        runner = web.AppRunner(create_app(edge), handler_cancellation=True, access_log=None)
        await runner.setup()
        try:
            site = GuardedSite(runner, "127.0.0.1", 0, edge.listeners.http)
            await site.start()
            yield Guarded(edge, int(site.name.rpartition(":")[2]))
        finally:
            await runner.cleanup()


def refusals(edge: Guarded, reason: str) -> float:
    text = generate_latest(edge.edge.metrics.registry).decode()
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            labels = sample.labels
            if sample.name == "backhaul_connections_refused_total" and labels == {
                "listener": "http",
                "reason": reason,
            }:
                return sample.value
    raise AssertionError("no backhaul_connections_refused_total{listener=http} series")


async def healthz(edge: Guarded) -> int:
    async with (
        aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=5)) as http,
        http.get(f"http://127.0.0.1:{edge.port}/healthz") as r,
    ):
        return r.status


async def test_one_address_is_capped_at_accept_and_others_are_served(tmp_path: Path):
    async with guarded_edge(tmp_path, max_connections_per_address=8) as edge:
        held = [await connect(edge.port) for _ in range(8)]
        try:
            assert await refused(edge.port)  # the 9th from the same address: closed at once
            assert edge.http.open == 8
            assert await healthz(edge) == 200  # another address is served
            assert await http_status(*held[0]) == 200  # the held ones are real connections
            held.pop(0)[1].close()
            async with asyncio.timeout(5):
                await edge.http.wait_open(7)  # the edge has seen the close
            reader, writer = await connect(edge.port)  # its slot is free again
            held.append((reader, writer))
            assert await http_status(reader, writer) == 200
        finally:
            close_all([w for _, w in held])
        assert refusals(edge, "per_address") == 1


async def test_the_total_cap_holds_for_every_address(tmp_path: Path):
    async with guarded_edge(tmp_path, max_connections=6, max_connections_per_address=4) as edge:
        held = [await connect(edge.port, "127.0.0.2") for _ in range(4)]
        held += [await connect(edge.port, "127.0.0.3") for _ in range(2)]
        try:
            assert await refused(edge.port, "127.0.0.4")
            assert await refused(edge.port, "127.0.0.1")
            assert refusals(edge, "total") == 2
            held.pop()[1].close()
            async with asyncio.timeout(5):
                await edge.http.wait_open(5)
            assert await healthz(edge) == 200
        finally:
            close_all([w for _, w in held])


async def test_a_trusted_proxy_is_exempt_from_the_per_address_cap_not_the_total(tmp_path: Path):
    settings = {
        "trusted_proxies": [f"{ATTACKER}/32"],
        "max_connections_per_address": 2,
        "max_connections": 6,
    }
    async with guarded_edge(tmp_path, **settings) as edge:
        held = [await connect(edge.port) for _ in range(6)]  # all from the proxy's address
        try:
            assert [await http_status(*c) for c in held] == [200] * 6
            assert await refused(edge.port)  # the total still holds
            assert refusals(edge, "total") == 1
            assert refusals(edge, "per_address") == 0
        finally:
            close_all([w for _, w in held])


async def test_a_flood_of_refusals_is_one_log_event(tmp_path: Path):
    async with guarded_edge(tmp_path, max_connections_per_address=1) as edge:
        _, writer = await connect(edge.port)
        try:
            with captured_logs() as logs:
                for _ in range(30):
                    assert await refused(edge.port)
            events = [e for e in logs if e["event"] == "edge.connections_refused"]
            assert len(events) == 1, events
            assert events[0]["listener"] == "http"
            assert events[0]["last_address"] == ATTACKER
            assert refusals(edge, "per_address") == 30
        finally:
            writer.close()


async def test_an_address_is_its_ipv4_spelling_or_its_ipv6_64():
    admission = Admission("http", total=100, per_address=2)
    assert admission.admit(("203.0.113.9", 1)) is not None
    assert admission.admit(("::ffff:203.0.113.9", 2, 0, 0)) is not None  # the same address
    assert admission.admit(("203.0.113.9", 3)) is None
    assert admission.admit(("2001:db8:0:1::1", 4, 0, 0)) is not None
    assert admission.admit(("2001:DB8:0:1:ffff::2", 5, 0, 0)) is not None  # the same /64
    assert admission.admit(("2001:db8:0:1::3", 6, 0, 0)) is None
    assert admission.admit(("2001:db8:0:2::1", 7, 0, 0)) is not None  # another /64
    assert admission.refused["per_address"] == 2
    admission.close()


def test_max_startups_drops_at_random_between_start_and_full():
    startups = MaxStartups.parse("10:30:100")
    assert not startups.refuses(9, draw=0.0)
    assert startups.refuses(10, draw=0.29) and not startups.refuses(10, draw=0.31)
    assert startups.refuses(55, draw=0.64) and not startups.refuses(55, draw=0.66)
    assert startups.refuses(100, draw=0.99)
    cap = MaxStartups.parse("3")
    assert not cap.refuses(2, draw=0.0) and cap.refuses(3, draw=0.99)


def test_handshake_rate_is_a_token_bucket_per_address():
    clock = Clock()
    rate = HandshakeRate(per_s=0.5, burst=2, clock=clock)
    assert rate.take("a") and rate.take("a") and not rate.take("a")
    assert rate.take("b")  # its own bucket
    clock.advance(2.0)  # one token back
    assert rate.take("a") and not rate.take("a")


def test_the_derived_total_leaves_room_for_what_requests_open_behind_them():
    assert derived_total(65536, reserved=128) == (65536 - 128 - 128) // 3
    assert derived_total(1024, reserved=128) == 256
    assert derived_total(100, reserved=128) == 64  # never below the floor
