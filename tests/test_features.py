"""Feature endpoints: a pinned model and prompt behind `POST /features/{name}`, for web pages."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import pytest
from aiohttp import web

from tests.support.cors import assert_preflight
from tests.support.keyfiles import assert_no_secret, bearer, captured_logs, keyed, write_keys
from tests.support.servers import edge, serving, simulator

ORIGIN = "https://blog.example"
SCHEMA = {
    "type": "object",
    "properties": {
        "points": {
            "type": "array",
            "items": {"type": "array", "items": {"type": "number"}, "minItems": 2, "maxItems": 2},
        }
    },
    "required": ["points"],
}
SCATTER = {
    "model": "llama3.2:1b",
    "system": "You turn descriptions into scatter plots.",
    "prompt": "Points for: {input}",
    "temperature": 0.3,
    "seed": 42,
    "json_schema": SCHEMA,
    "anonymous": True,
    "cors_origins": [ORIGIN],
}


@asynccontextmanager
async def json_model(content: str) -> AsyncIterator[tuple[str, list[Any]]]:
    """A model server whose every chat answer is `content`, whatever `format` asks (answers a
    model's grammar rules out; the simulator gives the ones it allows); yields its URL and the
    bodies seen."""
    seen: list[Any] = []

    async def version(request: web.Request) -> web.Response:
        return web.json_response({"version": "0.0.0"})

    async def chat(request: web.Request) -> web.Response:
        seen.append(await request.json())
        return web.json_response(
            {
                "model": "llama3.2:1b",
                "message": {"role": "assistant", "content": content},
                "done": True,
                "prompt_eval_count": 7,
                "eval_count": 5,
                "eval_duration": 100_000_000,
            }
        )

    app = web.Application()
    app.router.add_get("/api/version", version)
    app.router.add_post("/api/chat", chat)
    async with serving(app) as url:
        yield url, seen


async def test_cross_origin_anonymous_call_with_a_checked_json_answer(
    tmp_path: Path, http: aiohttp.ClientSession, caplog: pytest.LogCaptureFixture
):
    secrets = write_keys(tmp_path / "keys.json", other={})
    with captured_logs() as logs:
        async with (
            simulator() as sim,
            edge(sim.url, tmp_path, **keyed(tmp_path, features={"scatter": SCATTER})) as e,
        ):
            allowed = await assert_preflight(http, f"{e.url}/features/scatter", ORIGIN)
            assert allowed["Access-Control-Allow-Methods"] == "POST, OPTIONS"
            headers = {"Origin": ORIGIN, "X-Request-Id": "f1"}
            async with http.post(
                f"{e.url}/features/scatter", json={"input": "a rising line"}, headers=headers
            ) as r:
                assert r.status == 200
                # The simulator honours `format`: the smallest instance of the schema.
                assert await r.json() == {"output": {"points": [[0, 0]]}}
                assert r.headers["Access-Control-Allow-Origin"] == ORIGIN
                exposed = r.headers["Access-Control-Expose-Headers"]
                for name in ("X-Tok-Per-S", "X-Gen-Time", "X-Tokens", "RateLimit-Remaining"):
                    assert name in exposed
                assert r.headers["X-Tokens"] == "7" and float(r.headers["X-Tok-Per-S"]) > 0
                assert r.headers["RateLimit-Limit"] == "30"  # the anonymous default per address
            # The browser chose nothing but the input: everything else is the feature's.
            [body] = [s.body for s in sim.stats.requests if s.path == "/api/chat"]
            assert body["model"] == "llama3.2:1b" and body["stream"] is False
            assert body["messages"] == [
                {"role": "system", "content": SCATTER["system"]},
                {"role": "user", "content": "Points for: a rising line"},
            ]
            assert body["options"]["temperature"] == 0.3 and body["options"]["seed"] == 42
            assert body["options"]["num_predict"] == 4096
            assert body["format"] == SCHEMA
            record = await e.record("f1")
            assert record["feature"] == "scatter" and record["route"] == "/features/scatter"
            assert record["model"] == "llama3.2:1b" and record["key"] is None
            assert record["status"] == 200 and record["tokens"] == 7  # {" points ":[[ 0 , 0 ]]}
            assert record["prompt_tokens"] == 6 + 5  # words, the simulator's token count
            # The same call with a key is counted against the key.
            headers = {**bearer(secrets["other"]), "X-Request-Id": "f2"}
            async with http.post(
                f"{e.url}/features/scatter", json={"input": "x"}, headers=headers
            ) as r:
                assert r.status == 200
            assert (await e.record("f2"))["key"] == "other"
            await assert_no_secret(e, secrets, logs, caplog)


@pytest.mark.parametrize(
    ("content", "problem"),
    [
        ('{"points": [[1, 2], [3]]}', "does not match the schema"),
        ("Sure! Here are your points.", "not valid JSON"),
    ],
)
async def test_an_answer_that_breaks_the_schema_is_502(
    tmp_path: Path, http: aiohttp.ClientSession, content: str, problem: str
):
    with captured_logs() as logs:
        async with (
            json_model(content) as (url, _),
            edge(url, tmp_path, **keyed(tmp_path, features={"scatter": SCATTER})) as e,
        ):
            headers = {"Origin": ORIGIN, "X-Request-Id": "bad"}
            async with http.post(
                f"{e.url}/features/scatter", json={"input": "a line"}, headers=headers
            ) as r:
                assert r.status == 502
                assert r.headers["Access-Control-Allow-Origin"] == ORIGIN
                error = (await r.json())["error"]
            assert error["type"] == "invalid_model_output" and problem in error["message"]
            record = await e.record("bad")
            assert record["type"] == "invalid_model_output" and record["status"] == 502
            assert record["tokens"] == 5, "the tokens spent are still counted"
            assert [x["feature"] for x in logs if x["event"] == "feature.invalid_output"] == [
                "scatter"
            ]


async def test_an_answer_cut_at_the_output_cap_is_502(tmp_path: Path, http: aiohttp.ClientSession):
    # Ollama's `format` constrains every token, but the cap still cuts the JSON short.
    features = {"scatter": {**SCATTER, "max_tokens": 4}}
    async with (
        simulator() as sim,
        edge(sim.url, tmp_path, **keyed(tmp_path, features=features)) as e,
    ):
        headers = {"Origin": ORIGIN, "X-Request-Id": "cut"}
        async with http.post(
            f"{e.url}/features/scatter", json={"input": "x"}, headers=headers
        ) as r:
            assert r.status == 502
            error = (await r.json())["error"]
        assert error["type"] == "invalid_model_output" and "not valid JSON" in error["message"]
        assert (await e.record("cut"))["tokens"] == 4, "the tokens spent are still counted"


async def test_keyed_feature_streams_and_checks_the_keys_models(
    tmp_path: Path, http: aiohttp.ClientSession, caplog: pytest.LogCaptureFixture
):
    secrets = write_keys(tmp_path / "keys.json", writer={}, narrow={"models": ["qwen2.5:0.5b"]})
    summary = {"model": "llama3.2:1b", "prompt": "Summarise: {input}", "max_tokens": 8}
    features = {"summary": summary, "scatter": SCATTER}
    with captured_logs() as logs:
        async with (
            simulator(reply_tokens=20) as sim,
            edge(sim.url, tmp_path, **keyed(tmp_path, features=features)) as e,
        ):
            url = f"{e.url}/features/summary"
            async with http.post(url, json={"input": "text"}) as r:
                assert r.status == 401  # not anonymous
            headers = {**bearer(secrets["narrow"]), "X-Request-Id": "n"}
            async with http.post(url, json={"input": "text"}, headers=headers) as r:
                assert r.status == 403
            assert (await e.record("n"))["key"] == "narrow"
            headers = {**bearer(secrets["writer"]), "X-Request-Id": "w"}
            async with http.post(url, json={"input": "text"}, headers=headers) as r:
                assert r.status == 200
                output = (await r.json())["output"]
                assert isinstance(output, str) and output
                assert r.headers["X-Tokens"] == "8"  # the feature's own cap
            headers["X-Request-Id"] = "ws"
            async with http.post(f"{url}?stream=1", json={"input": "text"}, headers=headers) as r:
                assert r.status == 200
                assert r.headers["Content-Type"].startswith("application/x-ndjson")
                lines = [orjson.loads(line) async for line in r.content]
            assert lines[-1]["done"] is True and lines[-1]["eval_count"] == 8
            record = await e.record("ws")
            assert record["stream"] is True and record["feature"] == "summary"
            assert record["key"] == "writer" and record["tokens"] == 8
            # A checked answer cannot be streamed: it must be checked before it is sent.
            async with http.post(
                f"{e.url}/features/scatter?stream=1", json={"input": "x"}, headers=headers
            ) as r:
                assert r.status == 400
            chats = [s.body for s in sim.stats.requests if s.path == "/api/chat"]
            assert [c["messages"][-1]["content"] for c in chats] == ["Summarise: text"] * 2
            await assert_no_secret(e, secrets, logs, caplog)


async def test_feature_input_is_checked_before_anything_is_sent(
    tmp_path: Path, http: aiohttp.ClientSession
):
    features = {"tiny": {"model": "llama3.2:1b", "anonymous": True, "max_input_chars": 10}}
    async with (
        simulator() as sim,
        edge(sim.url, tmp_path, **keyed(tmp_path, features=features), anonymous_rpm=100) as e,
    ):
        url = f"{e.url}/features/tiny"
        cases = [
            ({"input": "x" * 10}, 200),
            ({"input": "x" * 11}, 413),
            ({"input": "x", "model": "other"}, 400),
            ({"input": 5}, 400),
            ({"input": " "}, 400),
            ([1], 400),
        ]
        for i, (body, status) in enumerate(cases):
            async with http.post(url, json=body, headers={"X-Request-Id": f"c{i}"}) as r:
                assert r.status == status, body
            assert (await e.record(f"c{i}"))["status"] == status
        async with http.post(url, data=b"x" * 100_000) as r:
            assert r.status == 413
            assert "10-character limit" in (await r.json())["error"]["message"]
        async with http.get(url) as r:
            assert r.status == 405
        async with http.post(f"{e.url}/features/nope", json={"input": "x"}) as r:
            assert r.status == 401  # an unknown feature is not anonymous: no key, no answer
        assert len([s for s in sim.stats.requests if s.path == "/api/chat"]) == 1
