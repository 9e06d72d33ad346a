"""Rate limits: requests and tokens per minute per key, per address for anonymous features."""

from __future__ import annotations

import tracemalloc
from pathlib import Path

import aiohttp
import pytest

from edge.policy.limits import Buckets
from tests.support.keyfiles import Clock, assert_no_secret, bearer, captured_logs, keyed, write_keys
from tests.support.servers import edge, simulator

GEN = {"model": "llama3.2:1b", "prompt": "why is the sky blue", "stream": False}


def frozen_clock(e) -> Clock:
    """Stop time for the edge's limiters: tests move it instead of sleeping."""
    clock = Clock()
    guard = e.edge.guard
    for buckets in guard.local_limits.buckets.values():
        buckets.clock = clock
    return clock


async def test_rpm_at_below_and_above_the_limit(
    tmp_path: Path, http: aiohttp.ClientSession, caplog: pytest.LogCaptureFixture
):
    secrets = write_keys(tmp_path / "keys.json", three={"rpm": 3})
    with captured_logs() as logs:
        async with simulator() as sim, edge(sim.url, tmp_path, **keyed(tmp_path)) as e:
            clock = frozen_clock(e)
            seen = []
            for i in range(3):  # below, then at the limit: allowed
                headers = {**bearer(secrets["three"]), "X-Request-Id": f"r{i}"}
                async with http.post(f"{e.url}/api/generate", json=GEN, headers=headers) as r:
                    assert r.status == 200
                    seen.append((r.headers["RateLimit-Limit"], r.headers["RateLimit-Remaining"]))
            assert seen == [("3", "2"), ("3", "1"), ("3", "0")]
            headers = {**bearer(secrets["three"]), "X-Request-Id": "over"}
            async with http.post(f"{e.url}/api/generate", json=GEN, headers=headers) as r:
                assert r.status == 429  # above
                body = await r.json()
                assert r.headers["Retry-After"] == "20"  # one request per 60/3 s
                assert r.headers["RateLimit-Remaining"] == "0"
                assert r.headers["RateLimit-Reset"] == "60"
            assert body["type"] == "rate_limited" and "3 requests per minute" in body["error"]
            record = await e.record("over")
            assert record["status"] == 429 and record["type"] == "rate_limited"
            assert record["key"] == "three"
            clock.advance(19.5)
            async with http.post(f"{e.url}/api/generate", json=GEN, headers=headers) as r:
                assert r.status == 429
                assert r.headers["Retry-After"] == "1"
            clock.advance(0.5)  # exactly 20 s: one request's worth is back
            async with http.post(f"{e.url}/api/generate", json=GEN, headers=headers) as r:
                assert r.status == 200
            generated = [s for s in sim.stats.requests if s.path == "/api/generate"]
            assert len(generated) == 4, "refused requests never reached the model server"
            await assert_no_secret(e, secrets, logs, caplog)


async def test_tpm_is_charged_after_the_response(tmp_path: Path, http: aiohttp.ClientSession):
    async with simulator(reply_tokens=10) as sim:
        # One request's cost (prompt + generated tokens), as the model server reports it.
        (tmp_path / "probe").mkdir()
        async with edge(sim.url, tmp_path / "probe") as probe:
            async with http.post(f"{probe.url}/api/generate", json=GEN) as r:
                assert r.status == 200
            [line] = await probe.records()
            cost = line["prompt_tokens"] + line["tokens"]
        secrets = write_keys(
            tmp_path / "keys.json", at={"tpm": 2 * cost}, below={"tpm": 2 * cost + 1}
        )
        async with edge(sim.url, tmp_path, **keyed(tmp_path)) as e:
            frozen_clock(e)
            for name, third in (("at", 429), ("below", 200)):
                statuses = []
                for i in range(3):
                    headers = {**bearer(secrets[name]), "X-Request-Id": f"{name}{i}"}
                    async with http.post(f"{e.url}/api/generate", json=GEN, headers=headers) as r:
                        statuses.append(r.status)
                        retry = r.headers.get("Retry-After")
                        body = await r.json()
                assert statuses == [200, 200, third], name
                if third == 429:
                    # Out of tokens exactly: one token's worth back after 60 / tpm seconds.
                    assert retry == str(max(1, -(-60 // (2 * cost))))
                    record = await e.record(f"{name}2")
                    assert record["type"] == "rate_limited" and record["key"] == "at"
                    assert "tokens per minute" in body["error"]


async def test_anonymous_feature_calls_are_limited_per_address(
    tmp_path: Path, http: aiohttp.ClientSession
):
    feature = {"model": "llama3.2:1b", "anonymous": True, "rpm": 2}
    secrets = write_keys(tmp_path / "keys.json", site={})
    settings = keyed(tmp_path, features={"hello": feature}, trusted_proxies=["127.0.0.1"])
    async with simulator() as sim, edge(sim.url, tmp_path, **settings) as e:
        frozen_clock(e)

        async def call(address: str, rid: str, headers: dict[str, str] | None = None) -> int:
            headers = {"X-Forwarded-For": address, "X-Request-Id": rid, **(headers or {})}
            async with http.post(
                f"{e.url}/features/hello", json={"input": "hi"}, headers=headers
            ) as r:
                await r.read()
                return r.status

        assert [await call("203.0.113.5", f"a{i}") for i in range(3)] == [200, 200, 429]
        # Another address (behind the same trusted proxy) has its own allowance...
        assert await call("203.0.113.6", "b0") == 200
        # ... and a keyed caller is counted by key, not by address.
        assert await call("203.0.113.5", "k0", bearer(secrets["site"])) == 200
        records = {r["id"]: r for r in await e.records()}
        assert records["a2"]["type"] == "rate_limited" and records["a2"]["client"] == "203.0.113.5"
        assert records["a2"]["feature"] == "hello" and records["a2"]["key"] is None
        assert records["k0"]["key"] == "site"


def test_buckets_stay_bounded_under_an_address_spray():
    clock = Clock()
    buckets = Buckets(max_entries=10_000, clock=clock)
    tracemalloc.start()
    try:
        for i in range(100_000):
            assert buckets.take(("spray", f"10.{i >> 16}.{i >> 8 & 255}.{i & 255}"), 30)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert len(buckets) == 10_000
    assert peak < 8 * 1024 * 1024, peak
    # A caller in debt is not forgotten while full (stateless) buckets are there to evict.
    buckets = Buckets(max_entries=4, clock=clock)
    for _ in range(2):
        buckets.take("heavy", 2)
    assert not buckets.take("heavy", 2)
    clock.advance(120)  # the others will be full by now; "heavy" is refilled too
    for name in ("a", "b", "c"):
        buckets.take(name, 60)
    assert buckets.take("heavy", 2)
    buckets.take("heavy", 2)
    for name in ("d", "e", "f"):  # three new names: evict full buckets, never "heavy"
        clock.advance(5)
        buckets.take(name, 1)
    assert not buckets.allows("heavy", 2), "the bucket in use was kept"


def test_retry_after_is_exact_for_fractional_rates():
    clock = Clock()
    buckets = Buckets(max_entries=10, clock=clock)
    for _ in range(7):
        assert buckets.take("k", 7)
        expected = buckets.decision("k", 7).headers()
        expected.pop("Retry-After", None)
        assert buckets.headers("k", 7) == expected  # the fast path says the same
    assert not buckets.take("k", 7)
    refused = buckets.decision("k", 7)
    assert not refused.allowed and refused.retry_after_s == 9  # ceil(60 / 7 = 8.57)
    assert refused.headers()["Retry-After"] == "9" and refused.headers()["RateLimit-Reset"] == "60"
    clock.advance(8.5)
    assert not buckets.take("k", 7)
    clock.advance(60 / 7 - 8.5)
    assert buckets.take("k", 7)
    # Tokens charged after the fact put a bucket into debt: 90 tokens on a 60-per-minute budget.
    buckets.charge("t", 60, 90)
    debt = buckets.decision("t", 60)
    assert not debt.allowed and debt.retry_after_s == 31 and debt.remaining == 0
