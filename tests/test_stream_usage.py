"""A key's tokens per minute hold on streamed answers whatever the client asked for.

The openai SDK streams without `stream_options.include_usage` unless told to, and Ollama's /v1
shim then sends no usage at all: the edge counts the generated tokens itself (one per chunk
that carries text) and charges them with an estimate of the prompt, without changing a byte of
what the client receives. A client that hangs up mid-answer is charged what was generated.
"""

from __future__ import annotations

import asyncio
import json
import re
from pathlib import Path
from typing import Any

import aiohttp
import openai
import orjson
import pytest

from edge.proxy.usage import TokenCount, estimate_prompt_tokens
from simulator import wire
from tests.support.keyfiles import Clock, bearer, keyed, write_keys
from tests.support.servers import Edge, edge, simulator

MODEL = "llama3.2:1b"
PROMPT = "why is the sky blue"
N = 12  # tokens in the simulator's reply
BIG = 10_000  # a tpm the test only reads the charge from


def _charged(e: Edge, key: str, tpm: int) -> int:
    """Tokens taken from `key`'s bucket so far (the edge's clock is frozen)."""
    return tpm - e.edge.guard.local_limits.buckets["tpm"].decision(key, tpm).remaining


def _prompt_tokens() -> int:
    """The edge's estimate of PROMPT's tokens, as it charges them when no usage is reported."""
    estimate = estimate_prompt_tokens(len(PROMPT))
    assert estimate is not None  # a prompt of known size always has one
    return estimate


def _frozen(e: Edge) -> None:
    clock = Clock()
    guard = e.edge.guard
    for buckets in guard.local_limits.buckets.values():
        buckets.clock = clock


def _client(e: Edge, secret: str) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=f"{e.url}/v1", api_key=secret, max_retries=0)


async def _sdk_stream(client: openai.AsyncOpenAI, chat: bool, rid: str) -> tuple[str, list[Any]]:
    """One streamed answer through the openai SDK as most code calls it: no stream_options."""
    headers = {"X-Request-Id": rid}
    if chat:
        stream: Any = await client.chat.completions.create(
            model=MODEL,
            messages=[{"role": "user", "content": PROMPT}],
            stream=True,
            extra_headers=headers,
        )
        chunks = [chunk async for chunk in stream]
        text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    else:
        stream = await client.completions.create(
            model=MODEL, prompt=PROMPT, stream=True, extra_headers=headers
        )
        chunks = [chunk async for chunk in stream]
        text = "".join(c.choices[0].text for c in chunks if c.choices)
    return text, chunks


@pytest.mark.parametrize("chat", [True, False], ids=["chat", "completions"])
async def test_streamed_tokens_are_charged_without_include_usage(tmp_path: Path, chat: bool):
    secrets = write_keys(tmp_path / "keys.json", meter={"tpm": BIG}, tight={"tpm": N})
    async with (
        simulator(reply_tokens=N) as sim,
        edge(sim.url, tmp_path, **keyed(tmp_path)) as e,
    ):
        _frozen(e)
        async with _client(e, secrets["meter"]) as client:
            text, chunks = await _sdk_stream(client, chat, "meter")
        # The client got the simulator's answer, and no usage it did not ask for.
        assert text == "".join(wire.reply(N))
        assert all(c.usage is None for c in chunks)
        record = await e.record("meter")
        prompt = _prompt_tokens()
        assert (record["tokens"], record["prompt_tokens"]) == (N, prompt)
        assert _charged(e, "meter", BIG) == N + prompt
        assert record["tok_per_s"] is not None

        # A key whose budget one such answer spends is refused the next one.
        async with _client(e, secrets["tight"]) as client:
            await _sdk_stream(client, chat, "tight0")
            with pytest.raises(openai.RateLimitError) as refused:
                await _sdk_stream(client, chat, "tight1")
        assert refused.value.status_code == 429
        assert "tokens per minute" in refused.value.message
        assert (await e.record("tight1"))["type"] == "rate_limited"
        generated = [s for s in sim.stats.requests if s.path.startswith("/v1/")]
        assert len(generated) == 2, "the refused request never reached the model server"


def _normalised(body: bytes) -> bytes:
    """An SSE body with what differs between two identical answers (id, time) blanked."""
    body = re.sub(rb'"id":"(chatcmpl|cmpl)-\d+"', b'"id":"-"', body)
    return re.sub(rb'"created":\d+', b'"created":0', body)


@pytest.mark.parametrize(
    ("path", "body"),
    [
        ("/v1/chat/completions", {"messages": [{"role": "user", "content": PROMPT}]}),
        ("/v1/completions", {"prompt": PROMPT}),
    ],
)
async def test_the_client_gets_the_upstream_stream_byte_for_byte(
    tmp_path: Path, http: aiohttp.ClientSession, path: str, body: dict[str, Any]
):
    secrets = write_keys(tmp_path / "keys.json", meter={"tpm": BIG})
    body = {"model": MODEL, "stream": True, "max_tokens": 100, **body}
    async with (
        simulator(reply_tokens=N) as sim,
        edge(sim.url, tmp_path, **keyed(tmp_path)) as e,
    ):
        _frozen(e)
        async with http.post(sim.url + path, json=body) as r:
            direct = await r.read()
        headers = {**bearer(secrets["meter"]), "X-Request-Id": "relayed"}
        async with http.post(e.url + path, json=body, headers=headers) as r:
            assert r.status == 200
            relayed = await r.read()
        assert _normalised(relayed) == _normalised(direct)
        assert direct.endswith(b"data: [DONE]\n\n") and b'"usage"' not in direct
        assert (await e.record("relayed"))["tokens"] == N
        assert _charged(e, "meter", BIG) == N + _prompt_tokens()


@pytest.mark.parametrize(
    ("path", "body"),
    [
        ("/v1/chat/completions", {"messages": [{"role": "user", "content": PROMPT}]}),
        ("/api/generate", {"prompt": PROMPT}),
    ],
)
async def test_a_client_that_hangs_up_is_charged_what_was_generated(
    tmp_path: Path, path: str, body: dict[str, Any]
):
    secrets = write_keys(tmp_path / "keys.json", meter={"tpm": BIG})
    read = 3
    # Paced, so the answer is still under way when the client leaves; the test waits on
    # events, never on time.
    async with (
        simulator(reply_tokens=500, tok_per_s=200.0, ttft=0.0) as sim,
        edge(sim.url, tmp_path, **keyed(tmp_path)) as e,
    ):
        _frozen(e)
        headers = {**bearer(secrets["meter"]), "X-Request-Id": "gone"}
        got = 0
        async with aiohttp.ClientSession() as http:
            payload = {"model": MODEL, "stream": True, **body}
            async with http.post(e.url + path, json=payload, headers=headers) as r:
                assert r.status == 200
                async for line in r.content:
                    got += line.startswith((b"data: {", b"{"))
                    if got == read:
                        break
        async with asyncio.timeout(10):
            record = await e.wait_record("gone")
            await sim.stats.wait_cancelled()
        assert record["outcome"] == "client_gone"
        assert read <= record["tokens"] < 500
        prompt = _prompt_tokens()
        assert record["prompt_tokens"] == prompt
        assert _charged(e, "meter", BIG) == record["tokens"] + prompt


def _sse(*deltas: dict[str, Any], chat: bool = True) -> bytes:
    out = b""
    for delta in deltas:
        choice = {"index": 0, "delta": delta} if chat else {"index": 0, **delta}
        out += b"data: " + orjson.dumps({"object": "x", "choices": [choice]}) + b"\n\n"
    return out + b"data: [DONE]\n\n"


def _fed(data: bytes, step: int) -> int:
    count = TokenCount()
    for i in range(0, len(data), step):
        count.feed(data[i : i + step])
    return count.tokens


def test_the_count_is_one_per_chunk_with_text_wherever_the_chunks_are_cut():
    stream = _sse(
        {"role": "assistant", "content": ""},  # a role-only first chunk: no token
        {"content": "Hi"},
        {"reasoning": "hm"},  # Ollama's thinking field
        {"reasoning_content": "so"},  # llama.cpp's and vLLM's
        {"tool_calls": [{"index": 0, "function": {"arguments": "{"}}]},
        {"content": None},
        {},  # the finish chunk
    )
    stream += b": a comment\n\nevent: ping\n\n"
    for step in (1, 2, 7, len(stream)):
        assert _fed(stream, step) == 4, step
    completions = _sse({"text": "a"}, {"text": "b"}, {"text": ""}, chat=False)
    assert _fed(completions.replace(b"\n", b"\r\n"), 3) == 2
    spaced = json.dumps({"choices": [{"delta": {"content": "a", "role": ""}}]})  # ": " and ", "
    assert _fed(f"data: {spaced}\n\ndata: [DONE]\n\n".encode(), 4) == 1
    native = b"".join(
        orjson.dumps(line) + b"\n"
        for line in (
            {"response": "The", "done": False},
            {"response": "", "thinking": "x", "done": False},
            {"message": {"role": "assistant", "content": "a"}, "done": False},
            {"response": "", "done": True, "eval_count": 3},
        )
    )
    assert _fed(native, 5) == 3


def test_a_line_too_long_to_be_a_chunk_is_skipped_and_memory_stays_bounded():
    count = TokenCount()
    count.feed(b'data: {"choices":[{"delta":{"content":"')
    for _ in range(200):
        count.feed(b"x" * 4096)  # 800 KiB without a newline: dropped as it comes
        assert len(count._partial) <= 64 * 1024
    count.feed(b'"}}]}\n\n' + _sse({"content": "a"}, {"content": "b"}))
    assert count.tokens == 2
