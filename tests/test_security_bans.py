"""The built-in fail2ban: guessing keys gets an address banned, and the ban outlives a restart."""

from __future__ import annotations

import asyncio
import tracemalloc
from pathlib import Path

import aiohttp
import orjson
import pytest

from edge.policy.bans import BanList
from tests.support.keyfiles import (
    Clock,
    assert_no_secret,
    bearer,
    captured_logs,
    keyed,
    reached,
    write_keys,
)
from tests.support.servers import edge, simulator

GEN = {"model": "llama3.2:1b", "prompt": "why", "stream": False}


async def test_brute_force_is_banned_and_the_ban_survives_a_restart(
    tmp_path: Path, http: aiohttp.ClientSession, caplog: pytest.LogCaptureFixture
):
    secrets = write_keys(tmp_path / "keys.json", real={})
    guesses = [f"bh_{i:043d}" for i in range(10)]
    with captured_logs() as logs:
        async with simulator() as sim:
            async with edge(sim.url, tmp_path, **keyed(tmp_path)) as e:
                # No key at all is refused but is not a guess: it does not count.
                for _ in range(12):
                    async with http.post(f"{e.url}/api/generate", json=GEN) as r:
                        assert r.status == 401
                for i, guess in enumerate(guesses):  # the default threshold: 10 in 10 minutes
                    headers = {**bearer(guess), "X-Request-Id": f"g{i}"}
                    async with http.post(f"{e.url}/api/generate", json=GEN, headers=headers) as r:
                        assert r.status == 401
                # Banned now: even the right key is refused, before anything else is looked at.
                headers = {**bearer(secrets["real"]), "X-Request-Id": "after"}
                async with http.post(f"{e.url}/api/generate", json=GEN, headers=headers) as r:
                    assert r.status == 403
                    body = await r.json()
                    retry = int(r.headers["Retry-After"])
                assert body["type"] == "banned" and 3590 <= retry <= 3600
                record = await e.record("after")
                assert record["type"] == "banned" and record["client"] == "127.0.0.1"
                assert record["key"] is None
                # Every path, unknown ones too; health probes are never banned.
                async with http.get(f"{e.url}/api/pull") as r:
                    assert r.status == 403
                async with http.get(f"{e.url}/healthz") as r:
                    assert r.status == 200
                assert reached(sim) == [], "nothing reached the model server"
                [banned] = [x for x in logs if x["event"] == "auth.banned"]
                assert banned["client"] == "127.0.0.1"
                await assert_no_secret(e, {**secrets, **{g: g for g in guesses}}, logs, caplog)
            # The edge stopped (its cleanup wrote the list); a new one reads the same file.
            saved = orjson.loads((tmp_path / "bans.json").read_bytes())
            assert list(saved["bans"]) == ["127.0.0.1"]
            async with edge(sim.url, tmp_path, **keyed(tmp_path)) as e2:
                headers = {**bearer(secrets["real"]), "X-Request-Id": "restarted"}
                async with http.post(f"{e2.url}/api/generate", json=GEN, headers=headers) as r:
                    assert r.status == 403
                assert (await e2.record("restarted"))["type"] == "banned"
                assert reached(sim) == []


async def test_concurrent_failures_ban_once(tmp_path: Path, http: aiohttp.ClientSession):
    write_keys(tmp_path / "keys.json", real={})
    with captured_logs() as logs:
        async with simulator() as sim, edge(sim.url, tmp_path, **keyed(tmp_path)) as e:

            async def guess(i: int) -> int:
                headers = bearer(f"bh_{i:043d}")
                async with http.post(f"{e.url}/api/generate", json=GEN, headers=headers) as r:
                    return r.status

            async with asyncio.timeout(20):
                statuses = await asyncio.gather(*(guess(i) for i in range(40)))
            assert set(statuses) <= {401, 403} and statuses.count(401) >= 10
            assert len([x for x in logs if x["event"] == "auth.banned"]) == 1
            assert len(e.edge.guard.bans) == 1
            records = await e.records()
            # Each refusal has its line, or (the banned address's past a burst) is counted.
            e.edge.guard.anonymous.report()
            events = [x for x in logs if x["event"] == "auth.unauthenticated_suppressed"]
            assert len(records) + sum(x["count"] for x in events) == 40
            assert {r["type"] for r in records} <= {"unauthorized", "banned"}


def test_failures_outside_the_window_do_not_add_up(tmp_path: Path):
    clock = Clock()
    bans = BanList(tmp_path / "b.json", threshold=3, window=60, period=100, clock=clock)
    assert not bans.fail("198.51.100.7")
    clock.advance(30)
    assert not bans.fail("198.51.100.7")
    clock.advance(31)  # the first failure is out of the window now
    assert not bans.fail("198.51.100.7")
    assert bans.banned_for("198.51.100.7") is None
    assert bans.fail("198.51.100.7")
    assert bans.banned_for("198.51.100.7") == pytest.approx(100)
    clock.advance(100)
    assert bans.banned_for("198.51.100.7") is None  # served its time


async def test_tables_stay_bounded_under_an_address_spray(tmp_path: Path):
    clock = Clock()
    bans = BanList(tmp_path / "b.json", threshold=2, window=600, period=3600,
                   max_entries=1000, clock=clock)  # fmt: skip
    tracemalloc.start()
    try:
        for i in range(100_000):
            address = f"10.{i >> 16 & 255}.{i >> 8 & 255}.{i & 255}"
            bans.fail(address)  # one failure each: 100k addresses counted, 1,000 kept
            bans.ban(address, clock() + 3600 + i)  # 100k bans offered, 1,000 kept
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert len(bans) == 1000 and len(bans._failures) <= 1000
    assert peak < 4 * 1024 * 1024, peak
    # The newest bans are kept (the oldest end first), and the file holds exactly them.
    assert bans.banned_for("10.1.134.159") is not None  # address number 99,999
    assert bans.banned_for("10.0.0.0") is None
    await bans.saved.save()
    assert len(orjson.loads((tmp_path / "b.json").read_bytes())["bans"]) == 1000


def test_a_broken_ban_file_is_no_bans_and_is_kept_aside(tmp_path: Path):
    path = tmp_path / "b.json"
    path.write_text("{garbage")
    bans = BanList(path)
    with captured_logs() as logs:
        bans.load()
    assert len(bans) == 0
    [event] = logs
    assert event["event"] == "bans.load_failed" and event["kept"] == f"{path}.broken"
    assert (tmp_path / "b.json.broken").read_text() == "{garbage"


async def test_a_bad_entry_is_skipped_and_the_others_kept(tmp_path: Path):
    clock = Clock(now=1000.0)
    path = tmp_path / "b.json"
    good = {"203.0.113.9": 5000.0, "2001:db8::/64": 6000, "198.51.100.1": 900.0}  # last: over
    bad = {"not-an-address": 5000.0, "192.0.2.7": "tomorrow", "10.0.0.0/8": 5000.0,
           "2001:db8:1::/48": 5000.0, "192.0.2.8": None, "192.0.2.9": True}  # fmt: skip
    original = orjson.dumps({"version": 1, "bans": {**bad, **good}})
    path.write_bytes(original)
    bans = BanList(path, clock=clock)
    with captured_logs() as logs:
        bans.load()
    assert bans.banned_for("203.0.113.9") == pytest.approx(4000)
    assert bans.banned_for("2001:db8::42") == pytest.approx(5000)
    assert len(bans) == 2
    [skipped] = [x for x in logs if x["event"] == "bans.entries_skipped"]  # one warning
    assert skipped["skipped"] == len(bad) and skipped["first"] == list(bad)[:3]
    assert (tmp_path / "b.json.broken").read_bytes() == original  # the operator's file, kept
    # The next save keeps every good ban (and drops what is over).
    await bans.saved.save()
    saved = orjson.loads(path.read_bytes())["bans"]
    assert saved == {"203.0.113.9": 5000.0, "2001:db8::/64": 6000.0}


def test_spellings_of_one_address_and_one_ipv6_64_are_one_client(tmp_path: Path):
    bans = BanList(None, threshold=3, window=600, period=100, clock=Clock())
    # IPv4 and its IPv4-mapped IPv6 spelling are the same client.
    assert not bans.fail("203.0.113.9")
    assert not bans.fail("::ffff:203.0.113.9")
    assert bans.fail("::FFFF:cb00:7109")
    assert bans.banned_for("203.0.113.9") is not None
    assert bans.banned_for("::ffff:203.0.113.9") is not None
    # Three addresses of one /64, spelled every way, are one client; the next /64 is not.
    assert not bans.fail("2001:DB8::1")
    assert not bans.fail("2001:db8:0:0:1234::9")
    assert bans.fail("2001:0db8:0000:0000:ffff:ffff:ffff:fffe")
    assert bans.banned_for("2001:db8::77") is not None
    assert bans.banned_for("2001:db8:0:1::1") is None
    assert bans.banned_for("203.0.113.10") is None


def test_a_ban_file_with_raw_spellings_loads_grouped(tmp_path: Path):
    path = tmp_path / "b.json"
    raw = {"2001:DB8::1": 5000.0, "2001:db8::2": 5500.0, "::ffff:203.0.113.9": 5000.0}
    path.write_bytes(orjson.dumps({"version": 1, "bans": raw}))
    bans = BanList(path, clock=Clock(now=1000.0))
    with captured_logs() as logs:
        bans.load()
    assert [x["event"] for x in logs] == ["bans.loaded"]
    assert len(bans) == 2
    assert bans.banned_for("2001:db8::abcd") == pytest.approx(4500)  # the later end holds
    assert bans.banned_for("203.0.113.9") == pytest.approx(4000)
