"""The cloud stand-in speaks OpenAI's wire format: the real `openai` SDK reads it, habits too."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import openai
import orjson
import pytest

from tests.support.cloud import CHAT_MODEL, EMBEDDING_MODEL, CloudStandIn, running_cloud

KEY = "sk-test-cloud"
HELLO: Any = [{"role": "user", "content": "say hello to me"}]
WEATHER: Any = [
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "parameters": {"type": "object", "properties": {"city": {"type": "string"}}},
        },
    }
]


@pytest.fixture
async def cloud() -> AsyncIterator[CloudStandIn]:
    async with running_cloud() as stand_in:
        yield stand_in


def sdk(cloud: CloudStandIn, key: str = KEY, **kw: Any) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=f"{cloud.url}/v1", api_key=key, max_retries=0, **kw)


async def raw_sse(http: aiohttp.ClientSession, cloud: CloudStandIn, **body: Any) -> bytes:
    headers = {"Authorization": f"Bearer {KEY}"}
    body = {"model": CHAT_MODEL, "messages": HELLO, "stream": True, **body}
    async with http.post(f"{cloud.url}/v1/chat/completions", json=body, headers=headers) as r:
        assert r.status == 200
        assert r.content_type == "text/event-stream"
        return await r.read()


async def test_chat_buffered(cloud: CloudStandIn):
    async with sdk(cloud) as client:
        reply = await client.chat.completions.create(model=CHAT_MODEL, messages=HELLO)
        assert reply.choices[0].message.content == " ".join(f"tok{i}" for i in range(8))
        assert reply.choices[0].finish_reason == "stop"
        assert reply.usage is not None
        assert (reply.usage.prompt_tokens, reply.usage.completion_tokens) == (4, 8)
        assert reply.usage.total_tokens == 12

        short = await client.chat.completions.create(
            model=CHAT_MODEL, messages=HELLO, max_completion_tokens=3
        )
        assert short.choices[0].message.content == "tok0 tok1 tok2"
        assert short.choices[0].finish_reason == "length"
        legacy = await client.chat.completions.create(
            model=CHAT_MODEL, messages=HELLO, max_tokens=50
        )
        assert legacy.usage is not None and legacy.usage.completion_tokens == 8  # the cap

    [first, second, third] = cloud.requests
    assert (first.method, first.path) == ("POST", "/v1/chat/completions")
    assert first.headers["authorization"] == f"Bearer {KEY}"
    assert first.body["messages"] == HELLO
    assert second.body["max_completion_tokens"] == 3
    assert cloud.bodies("/v1/chat/completions")[2]["max_tokens"] == 50
    assert not any(seen.cancelled for seen in (first, second, third))


async def test_chat_streamed_with_and_without_usage(cloud: CloudStandIn):
    async with sdk(cloud) as client:
        stream = await client.chat.completions.create(
            model=CHAT_MODEL,
            messages=HELLO,
            stream=True,
            stream_options={"include_usage": True},
            max_completion_tokens=4,
        )
        chunks = [chunk async for chunk in stream]
        assert chunks[0].choices[0].delta.role == "assistant"
        text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        assert text == "tok0 tok1 tok2 tok3"
        assert [c.choices[0].finish_reason for c in chunks[-2:-1]] == ["length"]
        assert chunks[-1].choices == []
        assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == 4
        assert all(c.usage is None for c in chunks[:-1])

        stream = await client.chat.completions.create(model=CHAT_MODEL, messages=HELLO, stream=True)
        chunks = [chunk async for chunk in stream]
        assert all(c.usage is None and c.choices for c in chunks)
        assert chunks[-1].choices[0].finish_reason == "stop"
        assert len(chunks) == 1 + 8 + 1  # the role, a chunk per token, the finish


async def test_sse_framing_is_openais(cloud: CloudStandIn, http: aiohttp.ClientSession):
    data = await raw_sse(http, cloud, max_tokens=2, stream_options={"include_usage": True})
    events = data.split(b"\n\n")
    assert events[-2:] == [b"data: [DONE]", b""]
    chunks = [orjson.loads(e.removeprefix(b"data: ")) for e in events[:-2]]
    assert all(e.startswith(b"data: {") for e in events[:-2])
    assert [c["choices"][0]["delta"] for c in chunks[:-1]] == [
        {"role": "assistant", "content": "", "refusal": None},
        {"content": "tok0"},
        {"content": " tok1"},
        {},
    ]
    assert [c["choices"][0]["finish_reason"] for c in chunks[:-1]] == [None, None, None, "length"]
    assert {c["object"] for c in chunks} == {"chat.completion.chunk"}
    assert chunks[-1]["choices"] == []
    assert chunks[-1]["usage"]["total_tokens"] == 4 + 2

    data = await raw_sse(http, cloud, max_tokens=2)
    assert b'"usage"' not in data and data.endswith(b"data: [DONE]\n\n")


async def test_tool_calls_when_the_habit_says_so(cloud: CloudStandIn):
    cloud.tool_arguments = {"city": "Lisbon"}
    async with sdk(cloud) as client:
        reply = await client.chat.completions.create(
            model=CHAT_MODEL, messages=HELLO, tools=WEATHER
        )
        choice = reply.choices[0]
        assert choice.finish_reason == "tool_calls"
        assert choice.message.content is None
        [call] = choice.message.tool_calls or []
        assert call.type == "function"
        assert call.function.name == "get_weather"
        assert orjson.loads(call.function.arguments) == {"city": "Lisbon"}

        stream = await client.chat.completions.create(
            model=CHAT_MODEL, messages=HELLO, tools=WEATHER, stream=True
        )
        arguments, names = "", []
        async for chunk in stream:
            for delta_call in chunk.choices[0].delta.tool_calls or []:
                assert delta_call.index == 0
                if delta_call.function and delta_call.function.name:
                    names.append(delta_call.function.name)
                if delta_call.function and delta_call.function.arguments:
                    arguments += delta_call.function.arguments
            finish = chunk.choices[0].finish_reason
        assert names == ["get_weather"]
        assert orjson.loads(arguments) == {"city": "Lisbon"}
        assert finish == "tool_calls"

        # No tools in the request: text, whatever the habit.
        plain = await client.chat.completions.create(model=CHAT_MODEL, messages=HELLO)
        assert plain.choices[0].message.tool_calls is None
        assert plain.choices[0].message.content


async def test_embeddings_and_models(cloud: CloudStandIn, http: aiohttp.ClientSession):
    async with sdk(cloud) as client:
        # The SDK asks for base64 and decodes it.
        reply = await client.embeddings.create(model=EMBEDDING_MODEL, input=["one two", "three"])
        assert cloud.bodies("/v1/embeddings")[0]["encoding_format"] == "base64"
        assert [d.index for d in reply.data] == [0, 1]
        assert all(len(d.embedding) == 8 for d in reply.data)
        assert reply.data[0].embedding != reply.data[1].embedding
        assert (reply.usage.prompt_tokens, reply.usage.total_tokens) == (3, 3)
        again = await client.embeddings.create(
            model=EMBEDDING_MODEL, input="one two", encoding_format="float"
        )
        assert again.data[0].embedding == pytest.approx(reply.data[0].embedding, rel=1e-6)

        models = await client.models.list()
        assert [m.id for m in models.data] == [CHAT_MODEL, EMBEDDING_MODEL]

    headers = {"Authorization": f"Bearer {KEY}"}
    body = {"model": EMBEDDING_MODEL, "input": "one two"}
    async with http.post(f"{cloud.url}/v1/embeddings", json=body, headers=headers) as r:
        answer = await r.json()
    assert answer["object"] == "list"
    assert answer["model"] == EMBEDDING_MODEL
    assert answer["data"][0]["object"] == "embedding"
    assert answer["usage"] == {"prompt_tokens": 2, "total_tokens": 2}


async def test_wrong_key_is_openais_401(cloud: CloudStandIn, http: aiohttp.ClientSession):
    async with sdk(cloud, key="sk-wrong") as client:
        with pytest.raises(openai.AuthenticationError) as denied:
            await client.chat.completions.create(model=CHAT_MODEL, messages=HELLO)
    assert denied.value.status_code == 401
    assert denied.value.code == "invalid_api_key"
    assert denied.value.type == "invalid_request_error"
    assert denied.value.body == {
        "message": denied.value.message.removeprefix("Error code: 401 - "),
        "type": "invalid_request_error",
        "param": None,
        "code": "invalid_api_key",
    }
    [seen] = cloud.requests  # recorded though refused
    assert seen.headers["Authorization"] == "Bearer sk-wrong"

    async with http.get(f"{cloud.url}/v1/models") as r:
        assert r.status == 401
        assert (await r.json())["error"]["message"].startswith("You didn't provide an API key")


async def test_fail_with_429_and_500(cloud: CloudStandIn):
    cloud.fail_with, cloud.retry_after, cloud.fail_times = 429, 7, 1
    async with sdk(cloud) as client:
        with pytest.raises(openai.RateLimitError) as limited:
            await client.chat.completions.create(model=CHAT_MODEL, messages=HELLO)
        assert limited.value.status_code == 429
        assert limited.value.code == "rate_limit_exceeded"
        assert limited.value.response.headers["Retry-After"] == "7"
        assert "try again in 7s" in limited.value.message
        # fail_times spent: answered again.
        reply = await client.chat.completions.create(model=CHAT_MODEL, messages=HELLO)
        assert reply.choices[0].message.content

        cloud.fail_with, cloud.fail_times = 500, None
        for _ in range(2):
            with pytest.raises(openai.InternalServerError) as failed:
                await client.embeddings.create(model=EMBEDDING_MODEL, input="x")
            assert failed.value.type == "server_error"
        cloud.fail_with = None
        with pytest.raises(openai.NotFoundError):
            await client.chat.completions.create(model="gpt-nonesuch", messages=HELLO)
    assert len(cloud.requests) == 5


async def test_hang_is_a_timeout(cloud: CloudStandIn):
    cloud.hang = True
    async with sdk(cloud, timeout=0.5) as client:
        with pytest.raises(openai.APITimeoutError):
            await client.chat.completions.create(model=CHAT_MODEL, messages=HELLO)
    [seen] = cloud.requests
    async with asyncio.timeout(10):
        await seen.ended.wait()
    assert seen.cancelled  # the client hung up; the stand-in saw it


async def test_die_after_tokens_cuts_the_stream(cloud: CloudStandIn, http: aiohttp.ClientSession):
    cloud.die_after_tokens = 3
    headers = {"Authorization": f"Bearer {KEY}"}
    body = {"model": CHAT_MODEL, "messages": HELLO, "stream": True}
    received: list[bytes] = []

    async def read_all(r: aiohttp.ClientResponse) -> None:
        async for data in r.content.iter_any():
            received.append(data)

    async with http.post(f"{cloud.url}/v1/chat/completions", json=body, headers=headers) as r:
        assert r.status == 200
        with pytest.raises(aiohttp.ClientPayloadError):
            await read_all(r)
    text = b"".join(received)
    assert text.count(b'"content":"') == 1 + 3  # the role's empty content, three tokens
    assert b"[DONE]" not in text and b'"finish_reason":"stop"' not in text

    async with sdk(cloud) as client:
        with pytest.raises(openai.APIConnectionError):
            await client.chat.completions.create(model=CHAT_MODEL, messages=HELLO)


async def test_paced_stream_can_be_cut_mid_way(cloud: CloudStandIn, http: aiohttp.ClientSession):
    cloud.tokens_per_s = 4  # 8 tokens: 2 s, long enough to leave after the first
    headers = {"Authorization": f"Bearer {KEY}"}
    body = {"model": CHAT_MODEL, "messages": HELLO, "stream": True}
    async with http.post(f"{cloud.url}/v1/chat/completions", json=body, headers=headers) as r:
        first = await r.content.readuntil(b"\n\n")
        assert b'"role":"assistant"' in first
        r.close()
    [seen] = cloud.requests
    async with asyncio.timeout(10):
        await seen.ended.wait()
    assert seen.cancelled
