"""The Ollama simulator, driven by real clients: the ollama and openai SDKs, and raw aiohttp
(JSON mode through the edge too).

Every test runs a real server on 127.0.0.1 port 0. Timing checks compare the simulator's own
figures and arrival times with each other and use only lower bounds from sleeps (a sleep never
ends early), so a slow, noisy machine makes them pass later, not fail.
"""

from __future__ import annotations

import asyncio
import json
import math
import signal
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import ollama
import openai
import pydantic
import pytest

from simulator import formats, gojson, wire
from simulator.app import BUSY
from simulator.serve import RunningSimulator, SimulatorSettings, running_simulator
from tests.support.servers import edge, simulator

LIMIT_S = 10.0  # bound on every wait; the whole file takes a few seconds
FAST = SimulatorSettings(reply_tokens=5)


@pytest.fixture
async def sim() -> AsyncIterator[RunningSimulator]:
    async with running_simulator(FAST) as running:
        yield running


async def test_ollama_sdk_generate_streamed_and_whole(sim: RunningSimulator) -> None:
    client = ollama.AsyncClient(host=sim.url)
    try:
        async with asyncio.timeout(LIMIT_S):
            stream = await client.generate(
                model="llama3.2:1b", prompt="why is it blue", stream=True
            )
            parts = [part async for part in stream]
            whole = await client.generate(
                model="llama3.2:1b", prompt="why", options={"num_predict": 3}
            )
    finally:
        await client.close()  # type: ignore[no-untyped-call]  # unannotated in ollama 0.6.3
    assert [p.done for p in parts] == [False] * 5 + [True]
    assert "".join(p.response or "" for p in parts) == "The quick brown fox jumps"
    final = parts[-1]
    assert (final.done_reason, final.eval_count, final.prompt_eval_count) == ("stop", 5, 4)
    assert final.eval_duration and final.total_duration and final.load_duration is not None
    assert final.total_duration >= final.eval_duration > 0
    assert final.context is not None and len(final.context) == 4 + 5
    assert (whole.response, whole.done_reason, whole.eval_count) == ("The quick brown", "length", 3)


async def test_ollama_sdk_chat_embed_and_catalogue(sim: RunningSimulator) -> None:
    client = ollama.AsyncClient(host=sim.url)
    messages = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi there"}]
    try:
        async with asyncio.timeout(LIMIT_S):
            stream = await client.chat(model="qwen2.5:0.5b", messages=messages, stream=True)
            parts = [part async for part in stream]
            whole = await client.chat(model="qwen2.5:0.5b", messages=messages, stream=False)
            embedded = await client.embed(model="nomic-embed-text", input=["a cat", "a dog"])
            again = await client.embed(model="nomic-embed-text", input="a cat")
            legacy = await client.embeddings(model="nomic-embed-text", prompt="a cat")
            tags, ps = await client.list(), await client.ps()
            shown = await client.show("llama3.2:1b")
    finally:
        await client.close()  # type: ignore[no-untyped-call]  # unannotated in ollama 0.6.3
    assert "".join(p.message.content or "" for p in parts) == whole.message.content
    assert parts[-1].message.role == "assistant"
    assert (whole.done_reason, whole.eval_count, whole.prompt_eval_count) == ("stop", 5, 4)
    vectors = embedded.embeddings
    assert len(vectors) == 2 and len(vectors[0]) == 768 and vectors[0] != vectors[1]
    assert math.isclose(math.fsum(v * v for v in vectors[0]), 1.0)  # /api/embed normalises
    assert again.embeddings[0] == vectors[0]  # deterministic
    assert len(legacy.embedding) == 768
    names = [m.model for m in tags.models]
    assert names == ["llama3.2:1b", "qwen2.5:0.5b", "nomic-embed-text:latest"]
    assert {m.model for m in ps.models} == {"qwen2.5:0.5b", "nomic-embed-text:latest"}
    assert shown.capabilities == ["completion", "tools"]
    assert shown.details is not None and shown.details.family == "llama"
    assert shown.modelinfo is not None and shown.modelinfo["llama.context_length"] == 131_072


async def test_openai_sdk_chat_completions_embeddings_models(sim: RunningSimulator) -> None:
    messages: Any = [{"role": "user", "content": "hello there you"}]
    async with openai.AsyncOpenAI(base_url=f"{sim.url}/v1", api_key="x", max_retries=0) as client:
        async with asyncio.timeout(LIMIT_S):
            stream = await client.chat.completions.create(
                model="llama3.2:1b",
                messages=messages,
                stream=True,
                stream_options={"include_usage": True},
            )
            chunks = [chunk async for chunk in stream]
            whole = await client.chat.completions.create(
                model="llama3.2:1b", messages=messages, max_tokens=2
            )
            uncapped = await client.chat.completions.create(
                model="llama3.2:1b", messages=messages, max_completion_tokens=1
            )
            completion = await client.completions.create(model="qwen2.5:0.5b", prompt="once upon")
            cstream = await client.completions.create(
                model="qwen2.5:0.5b",
                prompt="once",
                stream=True,
                stream_options={"include_usage": True},
            )
            cchunks = [chunk async for chunk in cstream]
            embedded = await client.embeddings.create(model="nomic-embed-text", input=["a", "b"])
            floats = await client.embeddings.create(
                model="nomic-embed-text", input="a", encoding_format="float"
            )
            listed = await client.models.list()
            one = await client.models.retrieve("qwen2.5:0.5b")
            with pytest.raises(openai.NotFoundError) as missing:
                await client.chat.completions.create(model="nope", messages=messages)

    assert chunks[0].system_fingerprint == "fp_ollama"
    assert chunks[0].object == "chat.completion.chunk"
    with_choices = [c for c in chunks if c.choices]
    assert "".join(c.choices[0].delta.content or "" for c in with_choices) == (
        "The quick brown fox jumps"
    )
    assert with_choices[-1].choices[0].finish_reason == "stop"
    assert chunks[-1].choices == [] and chunks[-1].usage is not None
    assert (chunks[-1].usage.prompt_tokens, chunks[-1].usage.completion_tokens) == (3, 5)
    assert whole.choices[0].message.content == "The quick"
    assert whole.choices[0].finish_reason == "length"
    assert whole.usage is not None and whole.usage.total_tokens == 3 + 2
    # Ollama reads max_tokens only (ollama/ollama#7125): the openai SDK's current parameter
    # caps nothing, so the edge must send max_tokens itself.
    assert uncapped.usage is not None and uncapped.usage.completion_tokens == 5
    assert completion.object == "text_completion"
    assert completion.choices[0].text == "The quick brown fox jumps"
    assert cchunks[-1].choices == [] and cchunks[-1].usage is not None
    assert cchunks[-1].usage.completion_tokens == 5
    assert [len(e.embedding) for e in embedded.data] == [768, 768]
    assert floats.data[0].embedding == pytest.approx(embedded.data[0].embedding, rel=1e-6)
    assert [m.id for m in listed.data][-1] == "nomic-embed-text:latest"
    assert (one.id, one.owned_by) == ("qwen2.5:0.5b", "library")
    assert missing.value.body == {
        "message": 'model "nope" not found, try pulling it first',
        "type": "not_found_error",
        "param": None,
        "code": None,
    }


async def _post(http: aiohttp.ClientSession, url: str, body: Any, **kw: Any) -> tuple[int, Any]:
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    async with http.post(url, data=data, **kw) as resp:
        text = await resp.text()
        try:
            return resp.status, json.loads(text)
        except ValueError:
            return resp.status, text


async def test_errors_guards_and_the_request_record(
    sim: RunningSimulator, http: aiohttp.ClientSession
) -> None:
    api = sim.url
    async with asyncio.timeout(LIMIT_S):
        assert await _post(http, f"{api}/api/generate", {"model": "x", "prompt": "hi"}) == (
            404,
            {"error": 'model "x" not found, try pulling it first'},
        )
        status, body = await _post(http, f"{api}/api/chat", b"{not json")
        assert status == 400 and isinstance(body["error"], str)
        status, body = await _post(http, f"{api}/v1/chat/completions", b"{not json")
        assert status == 400 and body["error"]["type"] == "invalid_request_error"
        assert await _post(http, f"{api}/api/generate", {"prompt": "hi"}) == (
            400,
            {"error": "model is required"},
        )
        assert await _post(
            http, f"{api}/api/generate", {"model": "nomic-embed-text", "prompt": "hi"}
        ) == (400, {"error": '"nomic-embed-text" does not support generate'})
        assert await _post(http, f"{api}/api/pull", {"model": "x"}) == (404, "404 page not found")
        # Ollama's DNS-rebinding and CORS guards: what the edge must not trip.
        evil_host = await _post(http, f"{api}/api/tags", {}, headers={"Host": "evil.example"})
        assert evil_host == (403, "")
        evil_origin = {"Origin": "https://evil.example"}
        assert (await _post(http, f"{api}/api/show", {"model": "x"}, headers=evil_origin))[0] == 403
        local = {"Origin": "http://localhost:3000"}
        shown = await _post(http, f"{api}/api/show", {"model": "qwen2.5:0.5b"}, headers=local)
        assert shown[0] == 200 and shown[1]["capabilities"] == ["completion", "tools"]
        async with http.get(f"{api}/api/version") as resp:
            assert await resp.json() == {"version": "0.12.6"}
        async with http.get(f"{api}/") as resp:
            assert await resp.text() == "Ollama is running"
    seen = sim.stats.requests
    assert [(r.method, r.path) for r in seen[:2]] == [
        ("POST", "/api/generate"),
        ("POST", "/api/chat"),
    ]
    assert seen[0].body == {"model": "x", "prompt": "hi"} and seen[1].body is None
    assert seen[-3].headers["Origin"] == "http://localhost:3000"


async def test_load_and_unload_requests_answer_at_once(http: aiohttp.ClientSession) -> None:
    # Pacing is slow, yet a load request must not wait for it: there is nothing to generate.
    async with running_simulator(SimulatorSettings(ttft=5.0, tok_per_s=1.0)) as sim:
        async with asyncio.timeout(2.0):
            status, loaded = await _post(http, f"{sim.url}/api/generate", {"model": "llama3.2:1b"})
            assert status == 200 and loaded["done_reason"] == "load" and loaded["done"] is True
            chat = {"model": "qwen2.5:0.5b", "messages": []}
            assert (await _post(http, f"{sim.url}/api/chat", chat))[1]["done_reason"] == "load"
            async with http.get(f"{sim.url}/api/ps") as resp:
                assert len((await resp.json())["models"]) == 2
            unload = {"model": "llama3.2:1b", "keep_alive": 0}
            status, body = await _post(http, f"{sim.url}/api/generate", unload)
            assert body["done_reason"] == "unload"
            async with http.get(f"{sim.url}/api/ps") as resp:
                assert [m["name"] for m in (await resp.json())["models"]] == ["qwen2.5:0.5b"]


@pytest.mark.parametrize(
    ("path", "body"),
    [
        ("/api/generate", {"model": "llama3.2:1b", "prompt": "tell me"}),
        (
            "/v1/chat/completions",
            {
                "model": "llama3.2:1b",
                "messages": [{"role": "user", "content": "hi"}],
                "stream": True,
            },
        ),
    ],
)
async def test_streams_are_paced_and_incremental(
    http: aiohttp.ClientSession, path: str, body: dict[str, Any]
) -> None:
    ttft, rate, n = 0.3, 10.0, 8
    settings = SimulatorSettings(ttft=ttft, tok_per_s=rate, reply_tokens=n)
    async with running_simulator(settings) as sim, asyncio.timeout(LIMIT_S):
        loop = asyncio.get_running_loop()
        sent = loop.time()
        arrivals: list[float] = []
        lines: list[bytes] = []
        async with http.post(f"{sim.url}{path}", json=body) as resp:
            expected = "application/x-ndjson" if path.startswith("/api") else "text/event-stream"
            assert resp.content_type == expected
            async for line in resp.content:
                if line.strip():
                    arrivals.append(loop.time())
                    lines.append(line)
    decode_s = (n - 1) / rate  # from the first token to the last
    # Sleeps never end early, so these are safe lower bounds however busy the machine is.
    assert arrivals[0] - sent >= 0.9 * ttft
    # Buffering would deliver everything at once; a stream spreads over the decode time.
    assert arrivals[-1] - arrivals[0] >= 0.5 * decode_s
    if path.startswith("/api"):
        final = json.loads(lines[-1])
        assert len(lines) == n + 1 and final["eval_count"] == n
        assert final["eval_duration"] >= 0.9 * n / rate * 1e9  # measured, at least n intervals
        assert final["eval_count"] / final["eval_duration"] * 1e9 <= rate * 1.05
        assert final["prompt_eval_duration"] >= 0.9 * (ttft - 1 / rate) * 1e9
    else:
        assert lines[-1] == b"data: [DONE]\n" and len(lines) == n + 2  # tokens, finish, [DONE]


async def test_queue_full_answers_503_like_ollama(http: aiohttp.ClientSession) -> None:
    settings = SimulatorSettings(parallel=1, max_queue=1, tok_per_s=20.0, reply_tokens=10)
    body = {"model": "llama3.2:1b", "prompt": "go", "stream": False}
    async with running_simulator(settings) as sim, asyncio.timeout(LIMIT_S):
        url = f"{sim.url}/api/generate"
        first = asyncio.create_task(_post(http, url, body))
        await sim.stats.wait_generating(1)
        second = asyncio.create_task(_post(http, url, body))
        await sim.stats.wait_queued(1)
        assert await _post(http, url, body) == (503, {"error": BUSY})
        chat = {"model": "llama3.2:1b", "messages": [{"role": "user", "content": "hi"}]}
        status, error = await _post(http, f"{sim.url}/v1/chat/completions", chat)
        assert (status, error["error"]["message"], error["error"]["type"]) == (
            503,
            BUSY,
            "api_error",
        )
        assert (await first)[0] == 200 and (await second)[0] == 200
        assert sim.stats.peak_generating == 1


async def test_client_going_away_cancels_generation(http: aiohttp.ClientSession) -> None:
    settings = SimulatorSettings(tok_per_s=20.0, reply_tokens=400)  # 20 s if left alone
    async with running_simulator(settings) as sim, asyncio.timeout(LIMIT_S):
        body = {"model": "llama3.2:1b", "prompt": "a long story"}
        resp = await http.post(f"{sim.url}/api/generate", json=body)
        first = json.loads(await resp.content.readline())
        assert first["done"] is False
        resp.close()  # drop the connection mid-stream
        await sim.stats.wait_cancelled(1)
        await sim.stats.wait_for(lambda s: s.generating == 0 and s.active == 0)


async def test_cli_serves_until_sigterm(http: aiohttp.ClientSession) -> None:
    proc = await asyncio.create_subprocess_exec(
        *(sys.executable, "-m", "agent", "simulate", "--port", "0", "--reply-tokens", "3"),
        *("--models", "tiny:1b,other-embed"),
        stderr=asyncio.subprocess.PIPE,
    )
    assert proc.stderr is not None
    try:
        async with asyncio.timeout(LIMIT_S):
            event: dict[str, Any] = {}
            while event.get("event") != "simulator.listening":
                line = await proc.stderr.readline()
                assert line, "the simulator exited before listening"
                event = json.loads(line) if line.startswith(b"{") else {}
            url = f"http://127.0.0.1:{event['port']}"
            async with http.get(f"{url}/api/tags") as resp:
                tags = await resp.json()
            assert [m["name"] for m in tags["models"]] == ["tiny:1b", "other-embed:latest"]
            status, final = await _post(
                http, f"{url}/api/generate", {"model": "tiny:1b", "prompt": "x", "stream": False}
            )
            assert (status, final["eval_count"]) == (200, 3)
            proc.send_signal(signal.SIGTERM)
            assert await proc.wait() == 0
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()


# What Go 1.19's encoding/json made of each body, decoding into structs shaped like Ollama's
# (run once by hand; the Go program is not part of the suite).
GO_READINGS: list[tuple[str, bytes, dict[str, Any]]] = [
    ("/api/generate", b'{"model":"a","MODEL":"b"}', {"model": "b"}),
    ("/api/generate", b'{"MODEL":"b","model":"a"}', {"model": "a"}),
    ("/api/generate", b'{"model":"a","model":"b"}', {"model": "b"}),
    ("/api/generate", b'{"model":"a","model":null}', {"model": "a"}),  # null: no change
    ("/api/generate", b'{"model":"a","\\u212aeep_alive":"0"}', {"model": "a", "keep_alive": "0"}),
    ("/api/generate", b'{"\\u017fystem":"s","\\u0131mages":["x"]}', {"system": "s"}),
    (
        "/api/generate",
        b'{"options":{"a":1},"options":{"b":2},"OPTIONS":{"a":3}}',
        {"options": {"a": 3, "b": 2}},  # objects merge into a map field
    ),
    ("/api/generate", b'{"options":{"a":1},"options":null}', {}),
    (
        "/v1/chat/completions",
        b'{"stream_options":{"include_usage":true},"stream_options":{}}',
        {"stream_options": {"include_usage": True}},  # and into a struct
    ),
    (
        "/api/chat",
        b'{"messages":[{"role":"u","content":"x"},{"role":"v"}],"messages":[{"Content":"y"}]}',
        {"messages": [{"role": "u", "content": "y"}]},  # a list decodes over the old one
    ),
]


@pytest.mark.parametrize(("path", "raw", "read"), GO_READINGS)
def test_bodies_are_read_as_go_reads_them(path: str, raw: bytes, read: dict[str, Any]) -> None:
    assert gojson.decode(path, gojson.parse(raw)) == read


def test_wrong_types_are_go_s_400s() -> None:
    with pytest.raises(gojson.DecodeError, match=r"GenerateRequest\.model of type string"):
        gojson.decode("/api/generate", gojson.parse(b'{"Model": 5}'))
    with pytest.raises(gojson.DecodeError, match="of type int"):
        gojson.decode("/v1/completions", gojson.parse(b'{"max_tokens": 1.5}'))
    assert gojson.option_int({"num_predict": 7.9}, "num_predict") == 7  # FromMap truncates
    assert gojson.option_int({"num_predict": 1e30}, "num_predict") == -(2**63)


async def test_the_simulator_acts_on_its_go_reading(
    sim: RunningSimulator, http: aiohttp.ClientSession
) -> None:
    body = b'{"model":"x","MODEL":"LLAMA3.2:1B","prompt":"hi","Stream":false,'
    body += b'"options":{"num_predict":2},"Options":{"temperature":1}}'
    async with asyncio.timeout(LIMIT_S):
        async with http.post(f"{sim.url}/api/generate", data=body) as resp:
            answer = await resp.json()
    assert (resp.status, answer["eval_count"]) == (200, 2)
    [seen] = [r for r in sim.stats.requests if r.path == "/api/generate"]
    assert seen.body["model"] == "x"  # Python's reading: the edge must never rely on it
    assert seen.decoded == {
        "model": "LLAMA3.2:1B",
        "prompt": "hi",
        "stream": False,
        "options": {"num_predict": 2, "temperature": 1},
    }


# JSON mode (`format`, `response_format`): the schemas below cover the subset `simulator.formats`
# instantiates; each answer is checked with jsonschema, as a client of a real model would.
POINTS = {
    "type": "object",
    "properties": {
        "points": {
            "type": "array",
            "items": {"type": "array", "items": {"type": "number"}, "minItems": 2, "maxItems": 2},
        },
        "note": {"type": "string"},
    },
    "required": ["points"],
}
POINTS_TEXT = '{"points":[[0,0]]}'  # its instance, as the simulator writes it
GEN = {"model": "llama3.2:1b", "prompt": "hi", "stream": False}
SCHEMAS: list[dict[str, Any]] = [
    POINTS,
    {},
    {"type": "array", "items": {"type": "integer", "minimum": 3}, "minItems": 2},
    {
        "$defs": {"Step": {"type": "object", "properties": {"why": {"type": "string"}}}},
        "type": "object",
        "properties": {
            "steps": {"type": "array", "items": {"$ref": "#/$defs/Step"}, "maxItems": 3},
            "kind": {"enum": ["a", "b"]},
            "fixed": {"const": {"x": [1, None]}},
            "either": {"anyOf": [{"type": "boolean"}, {"type": "string"}]},
            "maybe": {"type": ["null", "integer"], "exclusiveMinimum": 7},
            "low": {"type": "number", "exclusiveMaximum": -2},
            "short": {"type": "string", "minLength": 9, "maxLength": 9},
            "none": {"type": "null"},
        },
        "required": ["steps", "kind", "fixed", "either", "maybe", "low", "short", "none"],
        "additionalProperties": False,
    },
]


@pytest.mark.parametrize("schema", SCHEMAS)
def test_a_schema_s_answer_is_an_instance_of_it(schema: dict[str, Any]) -> None:
    import jsonschema

    text = "".join(formats.tokens(schema, 5))
    jsonschema.validate(json.loads(text), schema)
    assert "".join(formats.tokens(schema, 5)) == text  # deterministic


def test_format_is_read_as_ollama_reads_it() -> None:
    assert formats.native(None) is None and formats.native("") is None
    assert formats.native("json") == formats.JSON and formats.native({}) == {}
    for bad, shown in (("JSON", '"\\"JSON\\""'), ([1], '"[1]"')):
        with pytest.raises(wire.WireError) as refused:
            formats.native(bad)
        assert (refused.value.status, refused.value.message) == (
            500,
            f'invalid format: {shown}; expected "json" or a valid JSON Schema object',
        )
    assert formats.openai({"type": " JSON_Object"}) == formats.JSON
    assert formats.openai({"type": "json_schema", "json_schema": {"schema": POINTS}}) == POINTS
    for free in (
        {"type": "text"},
        {"type": "json_schema"},
        {"type": "json_schema", "json_schema": {}},
    ):
        assert formats.openai(free) is None


def _stream_text(lines: list[dict[str, Any]]) -> str:
    return "".join(line["message"]["content"] for line in lines)


async def test_native_json_mode_streams_a_json_answer_token_by_token(
    sim: RunningSimulator, http: aiohttp.ClientSession
) -> None:
    messages = [{"role": "user", "content": "plot"}]
    chat = {"model": "llama3.2:1b", "messages": messages, "format": POINTS}
    async with asyncio.timeout(LIMIT_S):
        async with http.post(f"{sim.url}/api/chat", json=chat) as resp:
            lines = [json.loads(line) async for line in resp.content]
        client = ollama.AsyncClient(host=sim.url)
        try:
            whole = await client.generate(model="llama3.2:1b", prompt="hi", format="json")
            cut = await client.chat(
                model="llama3.2:1b",
                messages=messages,
                format=POINTS,
                options={"num_predict": 4},
            )
        finally:
            await client.close()  # type: ignore[no-untyped-call]  # unannotated in ollama 0.6.3
        refused = await _post(http, f"{sim.url}/api/generate", {**GEN, "format": "xml"})
        # A load request generates nothing: Ollama never reads its format.
        loaded = await _post(http, f"{sim.url}/api/generate", {"model": "llama3.2:1b", "format": 1})
    final = lines[-1]
    assert final["done_reason"] == "stop" and final["eval_count"] == len(lines) - 1 > 3
    assert _stream_text(lines) == POINTS_TEXT
    assert json.loads(whole.response or "") == {
        "reply": "The quick brown fox jumps"
    }  # reply_tokens
    assert (cut.done_reason, cut.eval_count) == ("length", 4)
    assert cut.message.content == '{"points":[[0'
    with pytest.raises(json.JSONDecodeError):
        json.loads(cut.message.content or "")  # cut by the cap, as a real model's answer would be
    assert refused[0] == 500 and refused[1]["error"].startswith("invalid format:")
    assert loaded[0] == 200 and loaded[1]["done_reason"] == "load"


class Plot(pydantic.BaseModel):
    """What `chat.completions.parse` turns into a strict `json_schema` response format."""

    title: str
    points: list[tuple[float, float]]
    closed: bool


async def test_openai_response_format_is_honoured(sim: RunningSimulator) -> None:
    messages: Any = [{"role": "user", "content": "plot it"}]
    schema: Any = {"type": "json_schema", "json_schema": {"name": "points", "schema": POINTS}}
    async with openai.AsyncOpenAI(base_url=f"{sim.url}/v1", api_key="x", max_retries=0) as client:
        async with asyncio.timeout(LIMIT_S):
            as_object = await client.chat.completions.create(
                model="llama3.2:1b", messages=messages, response_format={"type": "json_object"}
            )
            stream = await client.chat.completions.create(
                model="llama3.2:1b", messages=messages, response_format=schema, stream=True
            )
            chunks = [c async for c in stream]
            parsed = await client.chat.completions.parse(
                model="llama3.2:1b", messages=messages, response_format=Plot
            )
            cut = await client.chat.completions.create(
                model="llama3.2:1b", messages=messages, response_format=schema, max_tokens=3
            )
            text = await client.chat.completions.create(
                model="llama3.2:1b", messages=messages, response_format={"type": "text"}
            )
            bad: Any = {"type": "json_schema", "json_schema": {"name": "x", "schema": [1]}}
            with pytest.raises(openai.InternalServerError) as refused:
                await client.chat.completions.create(
                    model="llama3.2:1b", messages=messages, response_format=bad
                )
    assert json.loads(as_object.choices[0].message.content or "") == {
        "reply": "The quick brown fox jumps"
    }
    pieces = [
        c.choices[0].delta.content for c in chunks if c.choices and c.choices[0].delta.content
    ]
    assert len(pieces) > 3 and "".join(pieces) == POINTS_TEXT
    assert parsed.choices[0].message.parsed == Plot(title="The", points=[(0, 0)], closed=True)
    assert cut.choices[0].finish_reason == "length" and cut.usage is not None
    assert (cut.choices[0].message.content, cut.usage.completion_tokens) == ('{"points":[[', 3)
    assert text.choices[0].message.content == "The quick brown fox jumps"
    assert refused.value.body == {
        "message": 'invalid format: "[1]"; expected "json" or a valid JSON Schema object',
        "type": "api_error",
        "param": None,
        "code": None,
    }
    [seen, *_] = [r for r in sim.stats.requests if r.path == "/v1/chat/completions"]
    assert seen.decoded is not None and seen.decoded["response_format"] == {"type": "json_object"}


async def test_json_mode_through_the_edge(tmp_path: Path, http: aiohttp.ClientSession) -> None:
    import jsonschema

    messages: Any = [{"role": "user", "content": "plot it"}]
    schema: Any = {"type": "json_schema", "json_schema": {"name": "points", "schema": POINTS}}
    async with simulator(reply_tokens=5) as sim, edge(sim.url, tmp_path) as e:
        async with openai.AsyncOpenAI(base_url=f"{e.url}/v1", api_key="x", max_retries=0) as client:
            async with asyncio.timeout(LIMIT_S):
                as_object = await client.chat.completions.create(
                    model="llama3.2:1b", messages=messages, response_format={"type": "json_object"}
                )
                stream = await client.chat.completions.create(
                    model="llama3.2:1b",
                    messages=messages,
                    response_format=schema,
                    stream=True,
                    extra_headers={"X-Request-Id": "j1"},
                )
                pieces = [c.choices[0].delta.content async for c in stream if c.choices]
        body = {"model": "llama3.2:1b", "messages": messages, "format": POINTS, "stream": False}
        async with asyncio.timeout(LIMIT_S):
            status, native = await _post(http, f"{e.url}/api/chat", body)
        record = await e.record("j1")
    assert isinstance(json.loads(as_object.choices[0].message.content or ""), dict)
    jsonschema.validate(json.loads("".join(p or "" for p in pieces)), POINTS)
    assert status == 200 and native["done_reason"] == "stop"
    jsonschema.validate(json.loads(native["message"]["content"]), POINTS)
    assert record["status"] == 200 and record["tokens"] == len(formats.tokens(POINTS, 5))
