"""The openai and ollama SDKs, pointed at the edge, work unchanged (and parse its errors)."""

from __future__ import annotations

from pathlib import Path

import ollama
import openai
import pytest

from tests.support.servers import edge, simulator

MODEL = "llama3.2:1b"


async def test_openai_sdk_chat(tmp_path: Path):
    async with simulator(reply_tokens=9) as sim, edge(sim.url, tmp_path) as e:
        client = openai.AsyncOpenAI(base_url=f"{e.url}/v1", api_key="unused", max_retries=0)
        async with client:
            reply = await client.chat.completions.create(
                model=MODEL, messages=[{"role": "user", "content": "hello"}]
            )
            assert reply.choices[0].message.content
            assert reply.usage is not None and reply.usage.completion_tokens == 9

            stream = await client.chat.completions.create(
                model=MODEL,
                messages=[{"role": "user", "content": "hello"}],
                stream=True,
                stream_options={"include_usage": True},
            )
            text, usage = "", None
            async for chunk in stream:
                if chunk.choices and chunk.choices[0].delta.content:
                    text += chunk.choices[0].delta.content
                if chunk.usage is not None:
                    usage = chunk.usage
            assert text and usage is not None and usage.completion_tokens == 9

            with pytest.raises(openai.PermissionDeniedError) as denied:
                await client.chat.completions.create(
                    model="x:1b-cloud", messages=[{"role": "user", "content": "hello"}]
                )
            assert denied.value.status_code == 403
            assert "not allowed" in denied.value.message
        records = await e.records()
        assert [r["status"] for r in records] == [200, 200, 403]
        assert [r["stream"] for r in records[:2]] == [False, True]


async def test_ollama_sdk_generate_and_chat(tmp_path: Path):
    async with simulator(reply_tokens=6) as sim, edge(sim.url, tmp_path) as e:
        client = ollama.AsyncClient(host=e.url)
        try:
            await _ollama_calls(client)
        finally:
            await client.close()  # type: ignore[no-untyped-call]  # ollama 0.6: close() is unannotated
        records = await e.records()
        assert [r["status"] for r in records] == [200, 200, 200, 200, 200, 403]
        assert [r["tokens"] for r in records[:4]] == [6, 6, 6, 6]


async def _ollama_calls(client: ollama.AsyncClient) -> None:
    reply = await client.generate(model=MODEL, prompt="why")
    assert reply.done and reply.eval_count == 6
    parts = [part async for part in await client.generate(model=MODEL, prompt="why", stream=True)]
    assert parts[-1].done and parts[-1].eval_count == 6

    chat = await client.chat(model=MODEL, messages=[{"role": "user", "content": "hi"}])
    assert chat.message.content and chat.eval_count == 6
    stream = await client.chat(
        model=MODEL, messages=[{"role": "user", "content": "hi"}], stream=True
    )
    chunks = [chunk async for chunk in stream]
    assert "".join(c.message.content or "" for c in chunks)
    assert chunks[-1].eval_count == 6

    listed = await client.list()
    assert MODEL in [m.model for m in listed.models]

    with pytest.raises(ollama.ResponseError) as denied:
        await client.generate(model="x:1b-cloud", prompt="why")
    assert denied.value.status_code == 403
