"""The opt-in cloud fallback (issue 13): when it serves and when it must not, the translator
behind the real SDKs, the cloud's own errors, costs, and a key that stays local.

The cloud is our OpenAI-compatible stand-in (tests/support/cloud.py: the real wire format); the
workstation is the simulator, or a port nothing listens on (the agent away).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import aiohttp
import ollama
import openai
import orjson

from edge.ops.summary import summarise
from tests.support.cloud import CHAT_MODEL, EMBEDDING_MODEL, CloudStandIn, running_cloud
from tests.support.keyfiles import bearer, keyed, write_keys
from tests.support.servers import Edge, Workstation, edge, free_port, simulator

LOCAL, ELSEWHERE = "llama3.2:1b", "qwen2.5:0.5b"  # the first may fall back, the second not
GEN = {"model": LOCAL, "prompt": "hi", "stream": False}
PRICE = {"input": 0.15, "output": 0.6}


def cloud_settings(tmp_path: Path, cloud: CloudStandIn, **settings: Any) -> dict[str, Any]:
    key_file = tmp_path / "cloud-key"
    key_file.write_text(cloud.api_key + "\n")
    return {
        "clouds": {
            "test": {
                "base_url": f"{cloud.url}/v1",
                "api_key_file": key_file,
                "models": {LOCAL: CHAT_MODEL, "nomic-embed-text": EMBEDDING_MODEL},
                "prices": {CHAT_MODEL: PRICE, EMBEDDING_MODEL: {"input": 0.02, "output": 0}},
            }
        },
        "fallback": {LOCAL: "test", "nomic-embed-text": "test"},
        "cost_reference": f"test:{CHAT_MODEL}",
        **settings,
    }


@asynccontextmanager
async def away(tmp_path: Path, cloud: CloudStandIn, **settings: Any) -> AsyncIterator[Edge]:
    """The edge in front of a workstation that is not there (nothing listens on its port)."""
    async with edge(
        f"http://127.0.0.1:{free_port()}", tmp_path, **cloud_settings(tmp_path, cloud, **settings)
    ) as e:
        yield e


async def post(
    http: aiohttp.ClientSession, e: Edge, path: str, body: Any, rid: str, **headers: str
) -> tuple[int, Any, Any]:
    async with http.post(
        f"{e.url}{path}", json=body, headers={"X-Request-Id": rid, **headers}
    ) as r:
        return r.status, orjson.loads(await r.read()), r.headers


async def test_agent_away_the_fallback_serves_a_model_that_allows_it_and_only_that(
    tmp_path: Path, http: aiohttp.ClientSession
) -> None:
    async with running_cloud() as cloud, away(tmp_path, cloud) as e:
        status, body, headers = await post(http, e, "/api/generate", GEN, "away")
        assert status == 200, body
        assert body["done"] is True and body["response"].startswith("tok0")
        assert headers["X-Backhaul-Served-By"] == "cloud:test"
        record = await e.record("away")
        assert record["served_by"] == "cloud:test" and record["agent"] is None
        assert record["tokens"] == 8 and record["speed_source"] in ("measured", None)
        expected = (record["prompt_tokens"] * 0.15 + 8 * 0.6) / 1_000_000
        assert abs(record["cost_usd"] - expected) < 1e-9
        [sent] = cloud.bodies("/v1/chat/completions")
        assert sent["model"] == CHAT_MODEL and "keep_alive" not in sent
        # A model that names no fallback stays local: 503, and the cloud never hears of it.
        status, body, headers = await post(
            http, e, "/api/generate", {**GEN, "model": ELSEWHERE}, "local"
        )
        assert status == 503 and (await e.record("local"))["type"] == "agent_unavailable"
        assert len(cloud.requests) == 1


async def test_a_key_kept_local_never_reaches_the_cloud(
    tmp_path: Path, http: aiohttp.ClientSession
) -> None:
    secrets = write_keys(tmp_path / "keys.json", private={"local_only": True}, team={})
    async with running_cloud() as cloud, away(tmp_path, cloud, **keyed(tmp_path)) as e:
        status, _, _ = await post(http, e, "/api/generate", GEN, "p", **bearer(secrets["private"]))
        assert status == 503
        assert cloud.requests == []
        status, _, _ = await post(http, e, "/api/generate", GEN, "t", **bearer(secrets["team"]))
        assert status == 200 and len(cloud.requests) == 1


async def test_busy_past_the_bound_goes_to_the_cloud(
    tmp_path: Path, http: aiohttp.ClientSession
) -> None:
    async with (
        running_cloud() as cloud,
        simulator(reply_tokens=40, tok_per_s=20) as sim,
        edge(
            sim.url,
            tmp_path,
            max_inflight=1,
            **cloud_settings(tmp_path, cloud, fallback_wait=0.3),
        ) as e,
    ):
        held = asyncio.ensure_future(post(http, e, "/api/generate", GEN, "held"))
        async with asyncio.timeout(5):
            await sim.stats.wait_generating(1)
        status, _, headers = await post(http, e, "/api/generate", GEN, "busy")
        assert status == 200 and headers["X-Backhaul-Served-By"] == "cloud:test"
        record = await e.record("busy")
        assert record["elapsed_ms"] >= 300  # it waited for the local slot first
        status, _, headers = await held
        assert status == 200 and headers["X-Backhaul-Served-By"] == "default"
        held_record = await e.record("held")
        assert held_record["served_by"] == "default" and held_record["cost_usd"] > 0  # saved


async def test_a_failure_before_the_first_byte_goes_to_the_cloud_and_mid_stream_does_not(
    tmp_path: Path, http: aiohttp.ClientSession
) -> None:
    async with (
        running_cloud() as cloud,
        Workstation(reply_tokens=200, tok_per_s=20, max_queue=0, parallel=1) as sim,
        edge(sim.url, tmp_path, max_inflight=4, **cloud_settings(tmp_path, cloud)) as e,
    ):
        # The first holds the simulator's one slot; the simulator answers the next 503 busy
        # (its queue is 0): before any byte, so the cloud serves it.
        stream = {**GEN, "stream": True}
        async with http.post(
            f"{e.url}/api/generate", json=stream, headers={"X-Request-Id": "long"}
        ) as held:
            assert held.status == 200
            await held.content.readline()
            status, body, headers = await post(http, e, "/api/generate", GEN, "refused")
            assert status == 200 and headers["X-Backhaul-Served-By"] == "cloud:test", body
            assert len(cloud.requests) == 1
            # The simulator goes away mid-stream: an error line and the cut, no cloud.
            await sim.stop()
            lines = []
            with contextlib.suppress(aiohttp.ClientPayloadError):
                async for line in held.content:
                    lines.append(orjson.loads(line))
        assert "error" in lines[-1]
        record = await e.wait_record("long")
        assert record["outcome"] == "upstream_broken" and record["served_by"] == "default"
        assert len(cloud.requests) == 1


async def test_the_sdks_read_cloud_answers_as_local_ones(tmp_path: Path) -> None:
    async with running_cloud() as cloud, away(tmp_path, cloud) as e:
        client = ollama.AsyncClient(host=e.url)
        try:
            await _ollama_calls(client)
        finally:
            await client.close()  # type: ignore[no-untyped-call]  # ollama 0.6: unannotated
        sdk = openai.AsyncOpenAI(base_url=f"{e.url}/v1", api_key="unused", max_retries=0)
        async with sdk:
            reply = await sdk.chat.completions.create(
                model=LOCAL, messages=[{"role": "user", "content": "hi"}]
            )
            assert reply.choices[0].message.content == " ".join(f"tok{i}" for i in range(8))
            chunks = [
                c
                async for c in await sdk.chat.completions.create(
                    model=LOCAL, messages=[{"role": "user", "content": "hi"}], stream=True
                )
            ]
            text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
            assert text.split() == [f"tok{i}" for i in range(8)]
        # Every cloud-served answer has its line, its place and its cost.
        records = await e.records()
        assert len(records) == 7
        assert {r["served_by"] for r in records} == {"cloud:test"}
        assert all(r["cost_usd"] and r["cost_usd"] > 0 for r in records)
        summary = summarise([e.telemetry_path], by="served_by")
        [group] = summary.groups.values()
        assert group.cloud_usd > 0 and group.saved_usd == 0


async def _ollama_calls(client: ollama.AsyncClient) -> None:
    hi = [{"role": "user", "content": "hi"}]
    chat = await client.chat(model=LOCAL, messages=hi)
    assert (chat.message.content or "").startswith("tok0") and chat.done
    assert chat.eval_count == 8
    parts = [p.message.content or "" async for p in await client.chat(LOCAL, hi, stream=True)]
    assert "".join(parts).split() == [f"tok{i}" for i in range(8)]
    generated = await client.generate(model=LOCAL, prompt="hi")
    assert (generated.response or "").startswith("tok0")
    streamed = [p async for p in await client.generate(model=LOCAL, prompt="hi", stream=True)]
    assert streamed[-1].done and streamed[-1].eval_count == 8
    embedded = await client.embed(model="nomic-embed-text", input=["a", "b"])
    assert len(embedded.embeddings) == 2 and len(embedded.embeddings[0]) == 8


async def test_the_clouds_own_errors_are_not_the_callers(
    tmp_path: Path, http: aiohttp.ClientSession
) -> None:
    async with running_cloud() as cloud, away(tmp_path, cloud) as e:
        cloud.fail_with = 401
        status, body, _ = await post(http, e, "/api/generate", GEN, "refused")
        assert status == 502 and body["type"] == "upstream_refused"
        assert "Your own API key is not the cause" in body["error"]
        cloud.fail_with, cloud.retry_after = 429, 7
        status, body, headers = await post(http, e, "/v1/chat/completions", {
            "model": LOCAL, "messages": [{"role": "user", "content": "hi"}]
        }, "limited")  # fmt: skip
        assert status == 503 and body["error"]["type"] == "upstream_busy"
        assert headers["Retry-After"] == "7"
        # The edge's own key reached the cloud; the caller's never does.
        assert all(r.headers["Authorization"] == f"Bearer {cloud.api_key}" for r in cloud.requests)


async def test_a_feature_keeps_working_when_the_workstation_is_off(
    tmp_path: Path, http: aiohttp.ClientSession
) -> None:
    features = {"say": {"model": LOCAL, "anonymous": True, "fallback": "test"}}
    async with running_cloud() as cloud, away(tmp_path, cloud, features=features) as e:
        status, body, headers = await post(http, e, "/features/say", {"input": "hello"}, "f")
        assert status == 200, body
        assert headers["X-Backhaul-Served-By"] == "cloud:test"
        assert (await e.record("f"))["served_by"] == "cloud:test"
