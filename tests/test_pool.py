"""Several workstations behind one edge (issue 11): routing by model, sharing, failover before
the first byte, an error line after it, cooldown, affinity, the queue, and what operators see.

Real simulators (one per workstation) and the real edge on loopback; the agents are the pool's
`upstreams` (system-sshd mode: each is its forward's URL), except where the SSH connection
itself is the subject (an agent killed, a connection replaced), which runs real asyncssh agents
through the edge's embedded SSH server.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import time
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager
from pathlib import Path
from typing import Any

import aiohttp
import orjson
from aiohttp import web

from edge.upstreams.base import State
from simulator.app import SimulatorSettings
from simulator.serve import running_simulator
from tests.support.metrics import scrape, value
from tests.support.servers import Edge, Workstation, edge, free_port, serving
from tests.support.sshd import (
    edge_with_sshd,
    make_key,
    public_line,
    ssh_connect,
)

SHARED, ONLY_A, ONLY_C = "llama3.2:1b", "qwen2.5:0.5b", "phi3:mini"


def sim(*models: str, **settings: Any) -> Any:
    return running_simulator(SimulatorSettings(models=models, **settings))


@asynccontextmanager
async def pool_edge(
    tmp_path: Path, upstreams: dict[str, str], **settings: Any
) -> AsyncIterator[Edge]:
    """The edge with `upstreams` (name -> URL) as its pool, once each has told its models."""
    listed = [{"name": name, "url": url} for name, url in upstreams.items()]
    async with edge("http://127.0.0.1:9", tmp_path, upstreams=listed, **settings) as e:
        async with asyncio.timeout(10):
            for agent in e.edge.pool.agents.values():
                await agent.refreshed.wait()
        yield e


async def ask(
    http: aiohttp.ClientSession, e: Edge, model: str, rid: str, **body: Any
) -> tuple[int, dict[str, Any]]:
    payload = {"model": model, "prompt": "hi", "stream": False, **body}
    async with http.post(f"{e.url}/api/generate", json=payload, headers={"X-Request-Id": rid}) as r:
        return r.status, orjson.loads(await r.read())


async def agents_of(e: Edge, prefix: str) -> collections.Counter[str]:
    return collections.Counter(r["agent"] for r in await e.records() if r["id"].startswith(prefix))


async def test_routed_by_model_with_404_and_503_as_the_pool_has_it(
    tmp_path: Path, http: aiohttp.ClientSession
) -> None:
    async with AsyncExitStack() as stack:
        a = await stack.enter_async_context(sim(SHARED, ONLY_A))
        b = await stack.enter_async_context(sim(SHARED))
        c = await stack.enter_async_context(sim(SHARED, ONLY_C))
        gone = await stack.enter_async_context(Workstation("mistral:7b"))
        e = await stack.enter_async_context(
            pool_edge(tmp_path, {"a": a.url, "b": b.url, "c": c.url, "gone": gone.url})
        )
        for i in range(6):
            assert (await ask(http, e, ONLY_A, f"only-a-{i}"))[0] == 200
            assert (await ask(http, e, ONLY_C, f"only-c-{i}"))[0] == 200
        assert await agents_of(e, "only-a") == {"a": 6}
        assert await agents_of(e, "only-c") == {"c": 6}
        # A model nobody has: the edge's own 404, in Ollama's shape.
        status, body = await ask(http, e, "nope:1b", "nobody")
        assert status == 404 and "not served by any workstation" in body["error"]
        assert (await e.record("nobody"))["type"] == "model_not_found"
        # A model only an absent workstation has: 503 with Retry-After, not 404.
        await gone.stop()
        async with asyncio.timeout(5):
            await e.edge.pool.agents["gone"].monitor.wait_state(State.AGENT_ABSENT)
        async with http.post(
            f"{e.url}/api/generate", json={"model": "mistral:7b", "prompt": "hi"}
        ) as r:
            assert r.status == 503 and r.headers["Retry-After"]
            assert (await r.json())["error"]
        # The merged listing: every reachable agent's models, each once.
        async with http.get(f"{e.url}/api/tags") as r:
            names = [m["name"] for m in (await r.json())["models"]]
        assert sorted(names) == sorted({SHARED, ONLY_A, ONLY_C})
        async with http.get(f"{e.url}/v1/models") as r:
            ids = [m["id"] for m in (await r.json())["data"]]
        assert sorted(ids) == sorted({SHARED, ONLY_A, ONLY_C})


async def test_two_equal_agents_share_200_concurrent_requests(
    tmp_path: Path, http: aiohttp.ClientSession
) -> None:
    async with (
        sim(SHARED, parallel=2, tok_per_s=400, reply_tokens=8) as a,
        sim(SHARED, parallel=2, tok_per_s=400, reply_tokens=8) as b,
        pool_edge(tmp_path, {"a": a.url, "b": b.url}, queue_max=256) as e,
    ):
        results = await asyncio.gather(*(ask(http, e, SHARED, f"share-{i}") for i in range(200)))
        assert all(status == 200 for status, _ in results)
        shares = await agents_of(e, "share-")
        assert sum(shares.values()) == 200
        assert 80 <= shares["a"] <= 120 and 80 <= shares["b"] <= 120, shares
        m = await scrape(http, e.url)
        for name in ("a", "b"):
            assert (
                value(m, "backhaul_agent_requests_total", agent=name, status="200") == shares[name]
            )
            assert value(m, "backhaul_agent_connected", agent=name) == 1
            assert value(m, "backhaul_agent_tokens_total", agent=name) == 8 * shares[name]


async def test_a_dead_workstation_costs_no_client_an_error_and_cools_down(
    tmp_path: Path, http: aiohttp.ClientSession
) -> None:
    # probe_interval 60: only requests find out that `a` died, as between two probes.
    async with (
        Workstation(SHARED) as a,
        sim(SHARED) as b,
        pool_edge(tmp_path, {"a": a.url, "b": b.url}, probe_interval=60, pool_affinity=False) as e,
    ):
        await a.stop()
        results = [await ask(http, e, SHARED, f"after-{i}", prompt=f"p{i}") for i in range(12)]
        assert [status for status, _ in results] == [200] * 12
        records = [r for r in await e.records() if r["id"].startswith("after-")]
        assert {r["agent"] for r in records} == {"b"}
        # Each request that met `a` first went on to `b` before any byte: a failover, logged.
        assert sum(r["failovers"] for r in records) >= 1
        m = await scrape(http, e.url)
        assert value(m, "backhaul_failovers_total") == sum(r["failovers"] for r in records)


async def test_a_busy_model_server_fails_over_then_cools_down(
    tmp_path: Path, http: aiohttp.ClientSession
) -> None:
    busy = web.Application()
    posts = 0

    async def listing(request: web.Request) -> web.Response:
        return web.json_response({"models": [{"name": SHARED}], "version": "0.12.6"})

    async def refuse(request: web.Request) -> web.Response:
        nonlocal posts
        posts += 1
        return web.json_response({"error": "server busy, please try again."}, status=503)

    busy.router.add_get("/api/version", listing)
    busy.router.add_get("/api/tags", listing)
    busy.router.add_get("/api/ps", listing)
    busy.router.add_post("/api/generate", refuse)
    async with (
        serving(busy) as busy_url,
        sim(SHARED) as b,
        pool_edge(tmp_path, {"busy": busy_url, "b": b.url}, pool_affinity=False) as e,
    ):
        for i in range(20):
            assert (await ask(http, e, SHARED, f"busy-{i}", prompt=f"p{i}"))[0] == 200
        # Three failures in a row cool it down: it is tried no more while it cools.
        assert 3 <= posts < 20
        agent = e.edge.pool.agents["busy"]
        assert agent.cooling(time.monotonic())
        m = await scrape(http, e.url)
        assert value(m, "backhaul_agent_cooling", agent="busy") == 1
        assert value(m, "backhaul_agent_cooling", agent="b") == 0


async def test_a_stream_cut_mid_way_gets_an_error_line_and_the_others_nothing(
    tmp_path: Path, http: aiohttp.ClientSession
) -> None:
    async with (
        Workstation(ONLY_A, tok_per_s=20, reply_tokens=200) as a,
        sim(SHARED, tok_per_s=50, reply_tokens=20) as b,
        pool_edge(tmp_path, {"a": a.url, "b": b.url}) as e,
    ):
        body = {"model": ONLY_A, "prompt": "long", "stream": True}
        others = [asyncio.ensure_future(ask(http, e, SHARED, f"other-{i}")) for i in range(4)]
        async with http.post(
            f"{e.url}/api/generate", json=body, headers={"X-Request-Id": "cut"}
        ) as r:
            assert r.status == 200
            await r.content.readline()  # a first token reached the client
            await a.stop()  # its model server dies mid-answer
            lines = []
            with contextlib.suppress(aiohttp.ClientPayloadError):  # then the cut
                async for line in r.content:
                    lines.append(orjson.loads(line))
        assert "error" in lines[-1]
        record = await e.wait_record("cut")
        assert record["outcome"] == "upstream_broken" and record["agent"] == "a"
        assert record["failovers"] == 0  # never sent again after a byte
        for status, _ in await asyncio.gather(*others):
            assert status == 200


async def test_a_dead_model_server_leaves_the_pool_within_5_s_and_comes_back(
    tmp_path: Path, http: aiohttp.ClientSession
) -> None:
    async with (
        Workstation(SHARED) as a,
        sim(SHARED) as b,
        pool_edge(tmp_path, {"a": a.url, "b": b.url}) as e,  # default probe settings
    ):
        agent = e.edge.pool.agents["a"]
        await a.stop()
        async with asyncio.timeout(5):
            while agent.healthy:
                await agent.monitor.wait_state(State.AGENT_ABSENT)
        for i in range(4):
            assert (await ask(http, e, SHARED, f"gone-{i}"))[0] == 200
        assert await agents_of(e, "gone-") == {"b": 4}
        assert (await e.record("gone-0"))["failovers"] == 0  # left out, not tried
        await a.start()  # the same port: the workstation is back
        async with asyncio.timeout(5):
            await agent.monitor.wait_state(State.UP)
        assert agent.monitor.reachable


async def test_a_conversation_stays_on_its_agent_unless_it_is_full(
    tmp_path: Path, http: aiohttp.ClientSession
) -> None:
    async with (
        sim(SHARED, reply_tokens=4) as a,
        sim(SHARED, reply_tokens=4) as b,
        pool_edge(tmp_path, {"a": a.url, "b": b.url}) as e,
    ):
        messages: list[dict[str, str]] = [{"role": "system", "content": "You are terse."}]
        for turn in range(10):
            messages.append({"role": "user", "content": f"question {turn}"})
            body = {"model": SHARED, "messages": messages, "stream": False}
            async with http.post(
                f"{e.url}/api/chat", json=body, headers={"X-Request-Id": f"turn-{turn}"}
            ) as r:
                assert r.status == 200
                messages.append((await r.json())["message"])
        turns = await agents_of(e, "turn-")
        assert max(turns.values()) >= 9, turns


async def test_when_every_agent_is_full_requests_queue_up_to_the_bound(
    tmp_path: Path, http: aiohttp.ClientSession
) -> None:
    async with (
        sim(SHARED, tok_per_s=20, reply_tokens=40) as a,
        sim(SHARED, tok_per_s=20, reply_tokens=40) as b,
        pool_edge(tmp_path, {"a": a.url, "b": b.url}, max_inflight=1, queue_max=2) as e,
    ):
        gate = e.edge.pool.gate
        tasks = [
            asyncio.ensure_future(ask(http, e, SHARED, f"q-{i}", prompt=f"p{i}")) for i in range(4)
        ]
        async with asyncio.timeout(5):
            await gate.wait_queued(2)
        assert gate.inflight == 2  # one on each agent
        status, _ = await ask(http, e, SHARED, "over")
        assert status == 503 and (await e.record("over"))["type"] == "overloaded"
        assert [s for s, _ in await asyncio.gather(*tasks)] == [200] * 4
        assert (
            await agents_of(e, "q-") == {"a": 2, "b": 2}
            or sum((await agents_of(e, "q-")).values()) == 4
        )


async def test_a_replaced_connection_retries_its_waiting_request_instead_of_a_504(
    tmp_path: Path, http: aiohttp.ClientSession
) -> None:
    """An agent that reconnects (after a half-open path) replaces its old connection; a request
    waiting on the old one was answered 504 `upstream_timeout` in milliseconds, though nothing
    timed out. It is sent again on the new connection."""
    bind = free_port()
    key = make_key(tmp_path / "agent_key", "rtx-box")
    (tmp_path / "agent_keys").write_text(public_line(key) + "\n")
    async with (
        sim(SHARED, ttft=1.5) as slow,
        edge_with_sshd(bind, tmp_path) as e,
        # The agent's connection, holding its forward to the model server, as the agent does.
        ssh_connect(e.sshd.port, e.sshd.host_public_key, key, "agent") as old,
    ):
        await old.forward_remote_port("127.0.0.1", bind, "127.0.0.1", slow.port)
        agent = e.edge.pool.agents["rtx-box"]
        async with asyncio.timeout(5):
            await agent.refreshed.wait()
        waiting = asyncio.ensure_future(ask(http, e, SHARED, "replaced"))
        async with asyncio.timeout(5):
            await slow.stats.wait_generating(1)
        # Its reconnect: the old connection is dropped at once, the new one holds the forward.
        async with ssh_connect(e.sshd.port, e.sshd.host_public_key, key, "agent") as new:
            await new.forward_remote_port("127.0.0.1", bind, "127.0.0.1", slow.port)
            status, body = await waiting
        assert status == 200, body
        record = await e.record("replaced")
        assert record["agent"] == "rtx-box" and record["failovers"] == 1
        assert record["type"] is None
