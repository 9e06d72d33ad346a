"""Several edges that agree through Redis (issue 12): shared limits, bans, keys and the GPU gate,
and what happens when Redis goes away and comes back.

Three real edges share one real `redis-server` (started by the test on a free loopback port)
and one simulator; requests are spread over the edges as DNS or a load balancer would.
"""

from __future__ import annotations

import asyncio
import os
import signal
import sys
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import pytest

from edge.cluster.leases import TTL_S
from edge.cluster.link import RedisLink
from tests.support.keyfiles import bearer, keyed, write_keys
from tests.support.processes import edge_process
from tests.support.redis import RedisServer, redis_server, requires_redis
from tests.support.servers import Edge, edge, simulator

pytestmark = [requires_redis(), pytest.mark.redis]

GEN = {"model": "llama3.2:1b", "prompt": "hi", "stream": False}
EDGE_CLI = str(Path(sys.executable).parent / "backhaul-edge")


@asynccontextmanager
async def edges(
    n: int, tmp_path: Path, upstream: str, redis: RedisServer, **settings: Any
) -> AsyncIterator[list[Edge]]:
    """`n` edges in front of `upstream`, sharing `redis` and one keys file in `tmp_path`."""
    async with AsyncExitStack() as stack:
        running = []
        for i in range(n):
            own = tmp_path / f"edge{i}"
            own.mkdir()
            e = await stack.enter_async_context(
                edge(
                    upstream,
                    own,
                    redis_url=redis.url,
                    # Three edges, a simulator and the clients share one event loop here, on
                    # a busy 2-core machine: a burst can delay a reply past the 50 ms default,
                    # which is the fallback's case, not agreement's (that is tested below).
                    redis_timeout=settings.pop("redis_timeout", 0.5),
                    edge_id=f"edge{i}",
                    state_dir=own,
                    **settings,
                )
            )
            running.append(e)
        for e in running:  # each has counted the others
            async with asyncio.timeout(10):
                # Counted by its heartbeat, every 2 s; there is no event for another's beat.
                while link(e).edges < n:  # noqa: ASYNC110
                    await asyncio.sleep(0.05)
        yield running


def link(e: Edge) -> RedisLink:
    assert e.edge.cluster is not None
    return e.edge.cluster.link


async def generate(
    http: aiohttp.ClientSession, e: Edge, rid: str, body: Any = GEN, **headers: str
) -> int:
    async with http.post(
        f"{e.url}/api/generate",
        json=body,
        headers={"X-Request-Id": rid, **headers},
        timeout=aiohttp.ClientTimeout(total=40),  # a hang is a failure here, not at 120 s
    ) as r:
        await r.read()
        return r.status


async def test_a_key_limited_to_30_a_minute_gets_30_over_three_edges(
    tmp_path: Path, http: aiohttp.ClientSession
) -> None:
    secrets = write_keys(tmp_path / "keys.json", ci={"rpm": 30})
    async with (
        redis_server(tmp_path / "redis") as redis,
        simulator(reply_tokens=2) as sim,
        edges(3, tmp_path, sim.url, redis, **keyed(tmp_path)) as fleet,
    ):
        statuses = await asyncio.gather(
            *(generate(http, fleet[i % 3], f"r{i}", **bearer(secrets["ci"])) for i in range(60))
        )
        served = statuses.count(200)
        # 30 at once, plus at most what the minute refilled while the 60 ran (one a 2 s).
        assert 30 <= served <= 31, statuses
        assert statuses.count(429) == 60 - served
        lines = [r for e in fleet for r in await e.records()]
        assert {r["limiter"] for r in lines} == {"redis"}


async def test_a_ban_made_on_one_edge_refuses_on_the_others(
    tmp_path: Path, http: aiohttp.ClientSession
) -> None:
    write_keys(tmp_path / "keys.json", ci={})
    async with (
        redis_server(tmp_path / "redis") as redis,
        simulator() as sim,
        edges(3, tmp_path, sim.url, redis, **keyed(tmp_path, ban_threshold=3)) as fleet,
    ):
        for i in range(3):
            assert await generate(http, fleet[0], f"guess{i}", **bearer("bh_" + "x" * 43)) == 401
        assert fleet[0].edge.guard.bans.banned_for("127.0.0.1") is not None
        # The other edges hear of it (pub/sub), well within the second.
        async with asyncio.timeout(1):
            banned = [e.edge.guard.bans for e in fleet[1:]]
            while any(b.banned_for("127.0.0.1") is None for b in banned):  # noqa: ASYNC110
                await asyncio.sleep(0.01)
        assert await generate(http, fleet[2], "after") == 403


async def test_the_gate_holds_across_edges(tmp_path: Path, http: aiohttp.ClientSession) -> None:
    async with (
        redis_server(tmp_path / "redis") as redis,
        # It would run 8 at once if it were sent 8: the edges must send it at most 2.
        simulator(reply_tokens=10, tok_per_s=100, parallel=8) as sim,
        edges(3, tmp_path, sim.url, redis, max_inflight=2) as fleet,
    ):
        statuses = await asyncio.gather(*(generate(http, fleet[i % 3], f"g{i}") for i in range(12)))
        assert statuses == [200] * 12
        assert sim.stats.peak_generating == 2


async def test_redis_away_then_back(tmp_path: Path, http: aiohttp.ClientSession) -> None:
    secrets = write_keys(tmp_path / "keys.json", ci={"rpm": 600})
    async with (
        redis_server(tmp_path / "redis") as redis,
        simulator() as sim,
        edges(2, tmp_path, sim.url, redis, **keyed(tmp_path)) as fleet,
    ):
        assert await generate(http, fleet[0], "before", **bearer(secrets["ci"])) == 200
        assert (await fleet[0].record("before"))["limiter"] == "redis"
        await redis.stop()
        # Requests go on, each edge deciding alone on its share of the limit.
        for i in range(6):
            assert await generate(http, fleet[i % 2], f"away{i}", **bearer(secrets["ci"])) == 200
        async with asyncio.timeout(10):
            while link(fleet[0]).up:
                await link(fleet[0]).wait_changed()
        assert await generate(http, fleet[0], "open", **bearer(secrets["ci"])) == 200
        record = await fleet[0].record("open")
        assert record["limiter"] == "local"
        async with http.get(f"{fleet[0].url}/readyz") as r:
            assert r.status == 200
            assert (await r.json())["status"] == "degraded"
        # Redis back on the same port: shared again.
        await redis.start()
        async with asyncio.timeout(10):
            while not link(fleet[0]).up:
                await link(fleet[0]).wait_changed()
        assert await generate(http, fleet[0], "back", **bearer(secrets["ci"])) == 200
        assert (await fleet[0].record("back"))["limiter"] == "redis"
        async with http.get(f"{fleet[0].url}/readyz") as r:
            assert (await r.json())["status"] == "ready"


async def _cli(*args: str, redis: RedisServer, keys_path: Path) -> tuple[int, str]:
    """`backhaul-edge keys ...` as an operator runs it on another VPS (its own keys file)."""
    proc = await asyncio.create_subprocess_exec(
        EDGE_CLI, "keys", "--keys-path", str(keys_path), *args,
        env={**os.environ, "BACKHAUL_EDGE_REDIS_URL": redis.url},
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    out, err = await proc.communicate()
    assert proc.returncode is not None
    return proc.returncode, out.decode() + err.decode()


async def _until_everywhere(fleet: list[Edge], http: aiohttp.ClientSession, secret: str,
                            status: int) -> None:  # fmt: skip
    """Every edge answers `status` to `secret` (asked every 20 ms)."""
    while True:
        answers = [await generate(http, e, "probe", **bearer(secret)) for e in fleet]
        if answers == [status] * len(fleet):
            return
        await asyncio.sleep(0.02)


async def test_a_key_added_or_revoked_anywhere_holds_on_every_edge_within_a_second(
    tmp_path: Path, http: aiohttp.ClientSession
) -> None:
    write_keys(tmp_path / "keys.json", ci={})
    elsewhere = tmp_path / "other-vps-keys.json"
    async with (
        redis_server(tmp_path / "redis") as redis,
        simulator() as sim,
        edges(3, tmp_path, sim.url, redis, **keyed(tmp_path)) as fleet,
    ):
        code, out = await _cli("add", "team", "--rpm", "100", redis=redis, keys_path=elsewhere)
        assert code == 0, out
        secret = out.split()[0]
        async with asyncio.timeout(1):
            await _until_everywhere(fleet, http, secret, 200)
        code, out = await _cli("revoke", "team", redis=redis, keys_path=elsewhere)
        assert code == 0, out
        async with asyncio.timeout(1):
            await _until_everywhere(fleet, http, secret, 401)
        # The last shared keys are kept on disk for a restart while Redis is away.
        saved = orjson.loads((tmp_path / "edge0" / "keys.shared.json").read_bytes())
        assert [(k["name"], k["enabled"]) for k in saved] == [("team", False)]


async def test_a_budget_is_spent_over_every_edge(
    tmp_path: Path, http: aiohttp.ClientSession
) -> None:
    # 5 generated tokens and a short prompt each: a 60-token day lasts a few answers in all.
    secrets = write_keys(tmp_path / "keys.json", ci={"budget": {"tokens": 60, "period": "day"}})
    async with (
        redis_server(tmp_path / "redis") as redis,
        simulator(reply_tokens=5) as sim,
        edges(3, tmp_path, sim.url, redis, **keyed(tmp_path)) as fleet,
    ):
        served = 0
        for i in range(30):
            status = await generate(http, fleet[i % 3], f"b{i}", **bearer(secrets["ci"]))
            if status == 429:
                break
            assert status == 200
            served += 1
            await asyncio.sleep(0.2)  # the edges add their charges twice a second
        per_answer = (await fleet[0].record("b0"))["tokens"] + (await fleet[0].record("b0"))[
            "prompt_tokens"
        ]
        # Alone, each edge would have served 60 / per_answer itself: three times as many.
        assert served <= -(-60 // per_answer) + 1, (served, per_answer)
        record = await fleet[i % 3].record(f"b{i}")
        assert record["type"] == "budget_exhausted"


async def test_an_edge_killed_holding_slots_frees_them_within_the_lease_bound(
    tmp_path: Path, http: aiohttp.ClientSession
) -> None:
    async with (
        redis_server(tmp_path / "redis") as redis,
        simulator(reply_tokens=400, tok_per_s=20, parallel=4) as sim,
        edges(1, tmp_path, sim.url, redis, max_inflight=2) as fleet,
    ):
        doomed = tmp_path / "doomed"
        doomed.mkdir()
        with edge_process(
            doomed, upstream=sim.url, redis_url=redis.url, edge_id="doomed", max_inflight="2"
        ) as (proc, port):
            url = f"http://127.0.0.1:{port}"
            streams = [asyncio.ensure_future(_hold(http, url, f"held{i}")) for i in range(2)]
            async with asyncio.timeout(15):
                await sim.stats.wait_generating(2)
            proc.send_signal(signal.SIGKILL)
            proc.wait()
            await asyncio.gather(*streams, return_exceptions=True)
        # Its leases outlive it until they expire: the survivor waits, then gets the slots.
        short = {**GEN, "options": {"num_predict": 2}}
        async with asyncio.timeout(TTL_S + 5):
            assert await generate(http, fleet[0], "after", short) == 200
        record = await fleet[0].record("after")
        assert record["queue_ms"] > 1000  # it waited for the dead edge's leases to expire


async def _hold(http: aiohttp.ClientSession, url: str, rid: str) -> None:
    body = {**GEN, "stream": True}
    async with asyncio.timeout(20):
        while True:
            try:
                async with http.post(
                    f"{url}/api/generate", json=body, headers={"X-Request-Id": rid}
                ) as r:
                    await r.read()
                    return
            except aiohttp.ClientConnectorError:  # not listening yet
                await asyncio.sleep(0.05)


async def test_tokens_per_minute_are_counted_over_every_edge(
    tmp_path: Path, http: aiohttp.ClientSession
) -> None:
    secrets = write_keys(tmp_path / "keys.json", ci={"tpm": 100})
    async with (
        redis_server(tmp_path / "redis") as redis,
        simulator(reply_tokens=10) as sim,
        edges(3, tmp_path, sim.url, redis, **keyed(tmp_path)) as fleet,
    ):
        used = 0
        for i in range(40):
            status = await generate(http, fleet[i % 3], f"t{i}", **bearer(secrets["ci"]))
            if status == 429:
                break
            record = await fleet[i % 3].record(f"t{i}")
            used += record["tokens"] + record["prompt_tokens"]
        # Served while under 100 a minute in all, the last answer's tokens past it at most; one
        # edge alone would have let the key use 100 there and 100 on each of the others.
        assert status == 429, used
        per_answer = record["tokens"] + record["prompt_tokens"]
        assert 100 <= used < 100 + per_answer + per_answer, used
        refused = await fleet[i % 3].record(f"t{i}")
        assert refused["type"] == "rate_limited" and refused["limiter"] == "redis"
