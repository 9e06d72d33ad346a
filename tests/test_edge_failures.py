"""When the tunnel, the agent or the model server fails, clients get a clear status at once."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import aiohttp
import orjson
from aiohttp import web

from edge.upstreams.base import State
from simulator.serve import running_simulator
from tests.support.keyfiles import captured_logs
from tests.support.refusals import assert_overloaded
from tests.support.servers import edge, free_port, raw_server, serving, simulator

GEN = {"model": "llama3.2:1b", "prompt": "hi", "stream": False}


async def test_agent_absent_is_503_at_once(tmp_path: Path, http: aiohttp.ClientSession):
    # A long connect timeout proves the answer does not wait for it.
    async with edge(f"http://127.0.0.1:{free_port()}", tmp_path, connect_timeout=30) as e:
        for i, path in enumerate(("/api/generate", "/v1/chat/completions")):
            start = time.perf_counter()
            body = {**GEN, "messages": []}
            async with http.post(
                f"{e.url}{path}", json=body, headers={"X-Request-Id": f"a{i}"}
            ) as r:
                assert r.status == 503
                assert r.headers["Retry-After"] == "5"
                payload = await r.json()
            assert time.perf_counter() - start < 10
            kind = payload["type"] if path.startswith("/api/") else payload["error"]["type"]
            assert kind == "agent_unavailable"
            record = await e.record(f"a{i}")
            assert record["status"] == 503 and record["type"] == "agent_unavailable"
        async with http.get(f"{e.url}/readyz") as r:
            assert r.status == 503
        async with http.get(f"{e.url}/healthz") as r:
            assert r.status == 200


async def test_half_open_tunnel_answers_503_before_read_timeout(
    tmp_path: Path, http: aiohttp.ClientSession
):
    async def silent(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await asyncio.Event().wait()  # accept and say nothing, like a dead SSH session

    async with (
        raw_server(silent) as url,
        edge(url, tmp_path, read_timeout=60, probe_timeout=0.3, probe_interval=0.3) as e,
    ):
        start = time.perf_counter()
        async with http.post(
            f"{e.url}/api/generate", json=GEN, headers={"X-Request-Id": "silent"}
        ) as r:
            assert r.status == 503
            assert (await r.json())["type"] == "agent_unavailable"
        assert time.perf_counter() - start < 30  # far below the 60 s read timeout
        record = await e.record("silent")
        assert record["type"] == "agent_unavailable"


async def test_model_server_down_behind_agent_is_502(tmp_path: Path, http: aiohttp.ClientSession):
    async def reset(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.read(1)  # accepted (the tunnel is up), then the far side fails
        writer.transport.abort()

    async with raw_server(reset) as url, edge(url, tmp_path, probe_interval=60) as e:
        async with http.post(f"{e.url}/api/generate", json=GEN, headers={"X-Request-Id": "r"}) as r:
            assert r.status == 502
            assert (await r.json())["type"] == "upstream_unavailable"
        assert (await e.record("r"))["type"] == "upstream_unavailable"


async def test_slow_first_byte_is_504(tmp_path: Path, http: aiohttp.ClientSession):
    async def version(request: web.Request) -> web.Response:
        return web.json_response({"version": "0.12.6"})

    async def stuck(request: web.Request) -> web.Response:
        await asyncio.sleep(30)
        return web.json_response({})

    app = web.Application()
    app.router.add_get("/api/version", version)
    app.router.add_post("/api/generate", stuck)
    async with serving(app) as url, edge(url, tmp_path, read_timeout=0.5) as e:
        async with http.post(f"{e.url}/api/generate", json=GEN, headers={"X-Request-Id": "t"}) as r:
            assert r.status == 504
            assert (await r.json())["type"] == "upstream_timeout"
        assert (await e.record("t"))["status"] == 504


async def test_upstream_queue_full_is_upstream_busy(tmp_path: Path, http: aiohttp.ClientSession):
    async with (
        simulator(parallel=1, max_queue=1, tok_per_s=20, reply_tokens=20) as sim,
        edge(sim.url, tmp_path, max_inflight=3) as e,
    ):

        async def call(i: int) -> int:
            async with http.post(
                f"{e.url}/api/generate", json=GEN, headers={"X-Request-Id": f"b{i}"}
            ) as r:
                await r.read()
                return r.status

        statuses = await asyncio.gather(*(call(i) for i in range(3)))
        assert sorted(statuses) == [200, 200, 503]
        busy = [r for r in await e.records() if r["status"] == 503]
        assert [r["type"] for r in busy] == ["upstream_busy"]


async def test_gate_full_is_overloaded(tmp_path: Path, http: aiohttp.ClientSession):
    async with (
        simulator(tok_per_s=20, reply_tokens=40, parallel=4) as sim,
        edge(sim.url, tmp_path, max_inflight=1, queue_max=0) as e,
    ):
        async with http.post(f"{e.url}/api/generate", json={**GEN, "stream": True}) as first:
            await first.content.readline()  # the one slot is taken
            await assert_overloaded(http, e, "full")
        assert (await e.record("full"))["type"] == "overloaded"


async def test_stream_broken_midway_is_cut_and_recorded(
    tmp_path: Path, http: aiohttp.ClientSession
):
    async def version(request: web.Request) -> web.Response:
        return web.json_response({"version": "0.12.6"})

    async def breaks(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Type": "application/x-ndjson"})
        await response.prepare(request)
        await response.write(b'{"model":"m","response":"a","done":false}\n')
        assert request.transport is not None
        request.transport.abort()  # the workstation vanished mid-answer
        return response

    app = web.Application()
    app.router.add_get("/api/version", version)
    app.router.add_post("/api/generate", breaks)
    async with serving(app) as url, edge(url, tmp_path) as e:
        lines: list[bytes] = []
        try:
            async with http.post(
                f"{e.url}/api/generate", json={**GEN, "stream": True}, headers={"X-Request-Id": "b"}
            ) as r:
                assert r.status == 200
                async for line in r.content:
                    lines.append(line)
            truncated = False
        except aiohttp.ClientPayloadError:
            truncated = True
        assert truncated, "a broken stream must not end like a complete one"
        assert b'"upstream_broken"' in b"".join(lines)
        record = await e.record("b")
        assert record["outcome"] == "upstream_broken"
        # ... and the edge keeps serving.
        async with http.get(f"{e.url}/healthz") as r:
            assert r.status == 200


async def test_agent_returning_is_noticed(tmp_path: Path, http: aiohttp.ClientSession):
    port = free_port()
    async with edge(f"http://127.0.0.1:{port}", tmp_path) as e:
        async with http.post(f"{e.url}/api/generate", json=GEN) as r:
            assert r.status == 503
        # The agent comes back: an upstream on the very port the edge knows.
        async with running_simulator(port=port):
            async with asyncio.timeout(10):  # the probe runs every 0.5 s while down
                await e.agent.monitor.wait_state(State.UP)
            async with http.post(f"{e.url}/api/generate", json=GEN) as r:
                assert r.status == 200


async def test_model_server_5xx_keeps_its_status_but_not_its_text(
    tmp_path: Path, http: aiohttp.ClientSession
):
    """A model server's error text (paths, versions) goes to the log, never to the client."""
    secret = "failed to load /home/alice/models/llama-3.2-1b-q4.gguf: CUDA error 2 (cuda 12.4)"

    async def version(request: web.Request) -> web.Response:
        return web.json_response({"version": "0.12.6"})

    async def failing(request: web.Request) -> web.Response:
        if request.path.startswith("/v1/"):
            return web.json_response(
                {"error": {"message": secret, "type": "server_error"}}, status=500
            )
        return web.json_response({"error": secret}, status=500)

    async def missing(request: web.Request) -> web.Response:
        return web.json_response({"error": "model 'llama3.2:1b' not found"}, status=404)

    app = web.Application()
    app.router.add_get("/api/version", version)
    app.router.add_post("/api/generate", failing)
    app.router.add_post("/v1/chat/completions", failing)
    app.router.add_post("/api/chat", missing)
    body = {**GEN, "messages": [{"role": "user", "content": "hi"}]}
    with captured_logs() as logs:
        async with serving(app) as url, edge(url, tmp_path) as e:
            for rid, path in (("n", "/api/generate"), ("o", "/v1/chat/completions")):
                headers = {"X-Request-Id": rid}
                async with http.post(f"{e.url}{path}", json=body, headers=headers) as r:
                    assert r.status == 500
                    raw = await r.read()
                assert b"alice" not in raw and b"cuda" not in raw.lower()
                payload = orjson.loads(raw)
                error = payload if path.startswith("/api/") else payload["error"]
                assert error["type"] == "upstream_error" and rid in str(error["request_id"])
                record = await e.record(rid)
                assert record["status"] == 500 and record["type"] == "upstream_error"
                assert record["outcome"] == "error"
            # A 4xx is the model server's word on the request: passed through as it is.
            async with http.post(f"{e.url}/api/chat", json=body) as r:
                assert r.status == 404
                assert (await r.json())["error"] == "model 'llama3.2:1b' not found"
    failed = [x for x in logs if x["event"] == "upstream.failed"]
    assert [x["request_id"] for x in failed] == ["n", "o"]
    assert all(x["status"] == 500 and x["message"] == secret for x in failed)
