"""Hardening of the edge's front door (issue 8): how the `Authorization` header is read, and
what an anonymous flood of refusals costs the telemetry file.

A real edge with a keys file in front of the simulator, aiohttp clients on loopback; a flood
comes from 127.0.0.2 or .3, the normal client from 127.0.0.1.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import aiohttp

from edge.auth import GUARD, AnonymousLines
from edge.exchange import Exchange
from shared.telemetry import RequestRecord
from tests.keyfiles import Clock, bearer, captured_logs, keyed, reached, write_keys
from tests.servers import edge, simulator

MODEL = "llama3.2:1b"
GEN = {"model": MODEL, "prompt": "why", "stream": False}


async def test_a_key_after_a_tab_or_any_case_of_bearer_is_served_and_no_failure(
    tmp_path: Path, http: aiohttp.ClientSession
):
    secrets = write_keys(tmp_path / "keys.json", good={})
    key = secrets["good"]
    # RFC 9110: the scheme is case-insensitive; HTAB read as SP, as tolerant servers do.
    spellings = [
        f"Bearer\t{key}",
        f"bearer {key}",
        f"BEARER  {key}",
        f"Bearer \t {key} \t",
        f"\tBearer\t\t{key}",
    ]
    with captured_logs() as logs:
        async with simulator() as sim, edge(sim.url, tmp_path, **keyed(tmp_path)) as e:
            for n, value in enumerate(spellings):
                headers = {"Authorization": value, "X-Request-Id": f"ok-{n}"}
                async with http.post(f"{e.url}/api/generate", json=GEN, headers=headers) as r:
                    assert r.status == 200, value
                assert (await e.record(f"ok-{n}"))["key"] == "good"
            assert len(reached(sim)) == len(spellings)
            assert not e.app[GUARD].bans._failures, "no failure counted towards a ban"

            # The wrong key with a TAB is still a wrong key, counted as one.
            wrong = {"Authorization": "Bearer\tbh_" + "A" * 43, "X-Request-Id": "wrong"}
            async with http.post(f"{e.url}/api/generate", json=GEN, headers=wrong) as r:
                assert r.status == 401
                assert (await r.json())["type"] == "unauthorized"
            assert (await e.record("wrong"))["type"] == "unauthorized"
            assert len(e.app[GUARD].bans._failures) == 1
    failed = [x for x in logs if x["event"] == "auth.failed"]
    assert [x["request_id"] for x in failed] == ["wrong"]


@asynccontextmanager
async def client_from(source: str) -> AsyncIterator[aiohttp.ClientSession]:
    """A session whose connections come from `source`, a loopback address."""
    connector = aiohttp.TCPConnector(local_addr=(source, 0))
    timeout = aiohttp.ClientTimeout(total=30)
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
        yield session


async def flood(session: aiohttp.ClientSession, url: str, count: int, **headers: str) -> None:
    """`count` anonymous requests, each answered in the route's own JSON error shape."""

    async def one(i: int) -> None:
        rid = {"X-Request-Id": f"flood-{i}"}
        async with session.post(url, json=GEN, headers={**headers, **rid}) as r:
            body = await r.json()
            assert r.status in (401, 403), r.status
        error = body["error"] if isinstance(body["error"], dict) else body  # /v1 or /api
        assert error["type"] == ("unauthorized" if r.status == 401 else "banned")
        assert error["request_id"] == rid["X-Request-Id"]

    async with asyncio.timeout(30):
        await asyncio.gather(*(one(i) for i in range(count)))


def suppressed(logs: list[dict[str, Any]], client: str, error_type: str) -> int:
    events = [x for x in logs if x["event"] == "auth.unauthenticated_suppressed"]
    return sum(x["count"] for x in events if x["client"] == client and x["type"] == error_type)


async def test_an_anonymous_flood_writes_a_bounded_number_of_lines_and_counts_the_rest(
    tmp_path: Path, http: aiohttp.ClientSession
):
    secrets = write_keys(tmp_path / "keys.json", good={})
    flooded, banned = 500, 100
    with captured_logs() as logs:
        async with simulator() as sim, edge(sim.url, tmp_path, **keyed(tmp_path)) as e:
            async with client_from("127.0.0.2") as attacker:
                await flood(attacker, f"{e.url}/api/generate", flooded)
                # A scheme and no key is no key: the same 401, the same count.
                await flood(attacker, f"{e.url}/v1/chat/completions", 1, Authorization="Bearer")
            # A banned address flooding on: the same bound (bans key on the address).
            e.app[GUARD].bans.ban("127.0.0.3", time.time() + 3600)
            async with client_from("127.0.0.3") as banned_client:
                await flood(banned_client, f"{e.url}/api/generate", banned, **bearer("x"))
            # Another address is served and written as ever, with or without its key.
            for rid, headers in (("keyed", bearer(secrets["good"])), ("keyless", {})):
                headers = {**headers, "X-Request-Id": rid}
                async with http.post(f"{e.url}/api/generate", json=GEN, headers=headers) as r:
                    assert r.status == (200 if rid == "keyed" else 401)
                assert (await e.record(rid))["client"] == "127.0.0.1"
            records = await e.records()
        # The edge has stopped: its last report is out.
    lines = {
        client: [r for r in records if r["client"] == client]
        for client in ("127.0.0.2", "127.0.0.3")
    }
    # A burst of 10 per address, and what refilled while the test ran (10 a minute).
    assert 10 <= len(lines["127.0.0.2"]) <= 12
    assert 10 <= len(lines["127.0.0.3"]) <= 12
    assert {r["type"] for r in lines["127.0.0.2"]} == {"unauthorized"}
    assert {r["type"] for r in lines["127.0.0.3"]} == {"banned"}
    # Nothing lost: every refusal is a line or in a count.
    assert len(lines["127.0.0.2"]) + suppressed(logs, "127.0.0.2", "unauthorized") == flooded + 1
    assert len(lines["127.0.0.3"]) + suppressed(logs, "127.0.0.3", "banned") == banned
    assert not [x for x in logs if x["event"] == "auth.failed"], "no key-less 401 is a guess"
    assert len(reached(sim)) == 1


def test_an_address_spray_is_capped_in_all_and_its_counts_stay_bounded():
    clock = Clock()
    lines = AnonymousLines(max_entries=1000, clock=clock)
    written = 0
    with captured_logs() as logs:
        for i in range(5000):
            record = RequestRecord(id=str(i), method="POST", route="/api/generate",
                                   client=f"10.0.{i >> 8 & 255}.{i & 255}")  # fmt: skip
            ex = Exchange(path="/api/generate", record=record)
            lines.note(ex, "unauthorized")
            written += not ex.aggregated
        assert len(lines._counts) <= 1001  # the table, and `*` for the addresses past it
        clock.advance(60)
        lines.report()
    assert written == 600  # the cap in all, though each address sent one
    events = [x for x in logs if x["event"] == "auth.unauthenticated_suppressed"]
    assert len(events) == 101  # 100 addresses named, the rest in one event
    assert sum(x["count"] for x in events) == 5000 - 600
    assert events[-1]["client"] == "*" and events[0]["window_s"] == 60.0
