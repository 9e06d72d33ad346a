"""The edge relays inference faithfully: bodies, streams, figures, headers, telemetry."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any

import aiohttp
import orjson
from aiohttp import web

from tests.support.cors import assert_preflight
from tests.support.servers import edge, serving, simulator

GEN: dict[str, Any] = {"model": "llama3.2:1b", "prompt": "why is the sky blue", "stream": False}


def upstream_bodies(sim: Any, path: str) -> list[Any]:
    return [seen.body for seen in sim.stats.requests if seen.path == path]


async def test_non_streamed_generate_carries_figures(tmp_path: Path, http: aiohttp.ClientSession):
    async with simulator(reply_tokens=12) as sim, edge(sim.url, tmp_path) as e:
        async with http.post(
            f"{e.url}/api/generate", json=GEN, headers={"X-Request-Id": "req-1"}
        ) as r:
            assert r.status == 200
            body = await r.json()
            headers = r.headers
        assert body["done"] is True and body["eval_count"] == 12
        assert headers["X-Request-Id"] == "req-1"
        assert headers["X-Tokens"] == "12"
        expected = body["eval_count"] / body["eval_duration"] * 1e9
        assert abs(float(headers["X-Tok-Per-S"]) - expected) <= 0.01 * expected + 0.01
        assert float(headers["X-Gen-Time"]) >= 0
        assert float(headers["X-Edge-Overhead-Ms"]) >= 0
        record = await e.record("req-1")
        assert record["status"] == 200 and record["outcome"] == "ok" and record["type"] is None
        assert record["route"] == "/api/generate" and record["model"] == "llama3.2:1b"
        assert record["stream"] is False and record["tokens"] == 12
        assert record["prompt_chars"] == len(GEN["prompt"])
        assert record["prompt_tokens"] == body["prompt_eval_count"]
        assert abs(record["tok_per_s"] - expected) <= 0.01 * expected + 0.01
        assert record["bytes_in"] > 0 and record["bytes_out"] > 0
        assert record["v"] == 1 and record["ts"].endswith("Z")


async def test_stream_is_relayed_chunk_by_chunk(tmp_path: Path, http: aiohttp.ClientSession):
    # 20 tokens at 40 tok/s: the stream lasts about half a second at the simulator.
    async with simulator(reply_tokens=20, tok_per_s=40) as sim, edge(sim.url, tmp_path) as e:
        arrivals: list[float] = []
        lines: list[dict[str, Any]] = []
        payload = {**GEN, "stream": True}
        async with http.post(
            f"{e.url}/api/generate", json=payload, headers={"X-Request-Id": "s1"}
        ) as r:
            assert r.status == 200
            assert r.headers["Content-Type"].startswith("application/x-ndjson")
            async for line in r.content:
                arrivals.append(time.perf_counter())
                lines.append(orjson.loads(line))
        assert len(lines) == 21 and lines[-1]["done"] is True
        assert "".join(x["response"] for x in lines[:-1])
        # Relayed as produced: the first token arrived long before the last one was made.
        spread = arrivals[-1] - arrivals[0]
        produced = lines[-1]["eval_duration"] / 1e9
        assert spread >= 0.5 * produced, (spread, produced)
        record = await e.record("s1")
        assert record["stream"] is True and record["tokens"] == 20
        assert record["outcome"] == "ok" and record["status"] == 200
        expected = 20 / (lines[-1]["eval_duration"] / 1e9)
        assert abs(record["tok_per_s"] - expected) <= 0.01 * expected


async def test_sse_stream_with_usage(tmp_path: Path, http: aiohttp.ClientSession):
    async with simulator(reply_tokens=7) as sim, edge(sim.url, tmp_path) as e:
        body = {
            "model": "llama3.2:1b",
            "messages": [{"role": "user", "content": "hello there"}],
            "stream": True,
            "stream_options": {"include_usage": True},
        }
        async with http.post(
            f"{e.url}/v1/chat/completions", json=body, headers={"X-Request-Id": "sse"}
        ) as r:
            assert r.status == 200
            assert r.headers["Content-Type"].startswith("text/event-stream")
            raw = await r.read()
        events = [e for e in raw.split(b"\n\n") if e]
        assert events[-1] == b"data: [DONE]"
        usage = orjson.loads(events[-2][len(b"data: ") :])["usage"]
        assert usage["completion_tokens"] == 7
        record = await e.record("sse")
        assert record["tokens"] == 7 and record["prompt_tokens"] == usage["prompt_tokens"]
        assert record["stream"] is True and record["tok_per_s"] is not None


async def test_body_is_sanitised_before_upstream(tmp_path: Path, http: aiohttp.ClientSession):
    async with (
        simulator(reply_tokens=100) as sim,
        edge(sim.url, tmp_path, max_output_tokens=50) as e,
    ):
        body = {
            **GEN,
            "keep_alive": 0,
            "_debug_render_only": True,
            "options": {"num_ctx": 131072, "num_gpu": 0, "temperature": 0.2, "num_predict": 10**6},
        }
        async with http.post(f"{e.url}/api/generate", json=body) as r:
            assert r.status == 200
            assert (await r.json())["eval_count"] == 50
        async with http.post(
            f"{e.url}/v1/chat/completions",
            json={"model": "llama3.2:1b", "messages": [{"role": "user", "content": "x"}]},
        ) as r:
            assert r.status == 200
            assert (await r.json())["usage"]["completion_tokens"] == 50
        [sent] = upstream_bodies(sim, "/api/generate")
        assert "keep_alive" not in sent and "_debug_render_only" not in sent
        assert sent["options"] == {"temperature": 0.2, "num_predict": 50}
        [chat] = upstream_bodies(sim, "/v1/chat/completions")
        assert chat["max_tokens"] == 50


async def test_model_allowlist_and_cloud_models(tmp_path: Path, http: aiohttp.ClientSession):
    async with simulator() as sim, edge(sim.url, tmp_path, models=["llama3.2:1b"]) as e:
        for model in ("qwen2.5:0.5b", "gpt-oss:120b-cloud"):
            async with http.post(
                f"{e.url}/api/chat",
                json={"model": model, "messages": []},
                headers={"X-Request-Id": f"m-{len(model)}"},
            ) as r:
                assert r.status == 403
                assert (await r.json())["type"] == "forbidden"
            record = await e.record(f"m-{len(model)}")
            assert record["status"] == 403 and record["type"] == "forbidden"
        assert upstream_bodies(sim, "/api/chat") == []
        async with http.get(f"{e.url}/api/tags") as r:
            names = [m["name"] for m in (await r.json())["models"]]
        assert names == ["llama3.2:1b"]
        async with http.get(f"{e.url}/v1/models") as r:
            ids = [m["id"] for m in (await r.json())["data"]]
        assert ids == ["llama3.2:1b"]


async def test_cloud_models_refused_with_open_allowlist(
    tmp_path: Path, http: aiohttp.ClientSession
):
    async with simulator() as sim, edge(sim.url, tmp_path) as e:
        body = {"model": "deepseek-v3.1:671b-cloud", "messages": []}
        async with http.post(f"{e.url}/v1/chat/completions", json=body) as r:
            assert r.status == 403
            assert (await r.json())["error"]["type"] == "forbidden"


async def test_show_hides_prompts_and_templates(tmp_path: Path, http: aiohttp.ClientSession):
    async with simulator() as sim, edge(sim.url, tmp_path) as e:
        async with http.post(f"{e.url}/api/show", json={"model": "llama3.2:1b"}) as r:
            assert r.status == 200
            body = await r.json()
        assert "details" in body
        assert not {"template", "modelfile", "system", "license", "parameters"} & set(body)


async def test_upstream_gets_loopback_host_and_no_origin(
    tmp_path: Path, http: aiohttp.ClientSession
):
    seen: list[dict[str, str]] = []

    async def capture(request: web.Request) -> web.Response:
        seen.append(dict(request.headers))
        return web.json_response({"version": "0.12.6"})

    app = web.Application()
    app.router.add_get("/api/version", capture)
    async with serving(app) as url, edge(url, tmp_path, cors_origins=["https://site.example"]) as e:
        headers = {
            "Origin": "https://site.example",
            "Cookie": "session=secret",
            "Authorization": "Bearer secret",
            "Connection": "keep-alive, X-Custom",
            "X-Custom": "1",
        }
        async with http.get(f"{e.url}/api/version", headers=headers) as r:
            assert r.status == 200
        sent = seen[-1]
        assert sent["Host"].startswith("127.0.0.1:")
        for name in ("Origin", "Cookie", "Authorization", "X-Custom", "Referer"):
            assert name not in sent


async def test_cors_preflight_and_exposed_headers(tmp_path: Path, http: aiohttp.ClientSession):
    origin = "https://site.example"
    async with simulator() as sim, edge(sim.url, tmp_path, cors_origins=[origin]) as e:
        await assert_preflight(http, f"{e.url}/api/generate", origin)
        async with http.post(f"{e.url}/api/generate", json=GEN, headers={"Origin": origin}) as r:
            assert r.status == 200
            exposed = r.headers["Access-Control-Expose-Headers"]
            for name in ("X-Tok-Per-S", "X-Gen-Time", "X-Tokens", "Retry-After"):
                assert name in exposed
        # Errors carry them too, or a browser cannot read Retry-After.
        async with http.post(f"{e.url}/api/generate", data=b"{", headers={"Origin": origin}) as r:
            assert r.status == 400
            assert r.headers["Access-Control-Allow-Origin"] == origin
            assert "X-Request-Id" in r.headers["Access-Control-Expose-Headers"]


async def test_client_gone_cancels_generation(tmp_path: Path, http: aiohttp.ClientSession):
    async with simulator(reply_tokens=400, tok_per_s=50) as sim, edge(sim.url, tmp_path) as e:
        payload = {**GEN, "stream": True}
        async with http.post(
            f"{e.url}/api/generate", json=payload, headers={"X-Request-Id": "gone"}
        ) as r:
            await r.content.readline()  # generation has started
        # Leaving the block closed the connection mid-stream: the simulator must see it.
        async with asyncio.timeout(10):
            await sim.stats.wait_cancelled(1)
            record = await e.wait_record("gone")  # written as the cancelled handler unwinds
        assert record["outcome"] == "client_gone"
        assert 1 <= record["tokens"] < 400  # what was generated is charged (test_stream_usage)
