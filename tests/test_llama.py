"""The real-model tier: the whole pair in front of llama.cpp's own `llama-server`, through the
real openai SDK.

The other tiers run the simulator and stand-ins written from llama.cpp's source; this one runs
the real server (built by scripts/llama.py, SmolLM2-135M-Instruct) behind the edge, its embedded
SSH server and a `backhaul-agent run` process, and checks what only the real thing can show: a
chat answers and streams, the edge's output cap holds against every field llama.cpp reads as
one (`n_predict` wins over `max_tokens` there), embeddings come back, and a run of mixed
requests loses none to the server closing its connection after a streamed answer (issue 16).
Answers are kept to a few tokens: the tier takes well under a minute on two cores.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiohttp
import openai
import orjson
import pytest
from openai.types.chat import ChatCompletionMessageParam

from tests.support.llama import MODEL, llama_server, pair_in_front, requires_llama

pytestmark = [pytest.mark.llama, requires_llama()]

CAP = 8  # the edge's max_output_tokens where answers are checked against it
# A prompt SmolLM2 answers at length: without the cap it writes far past CAP tokens.
LONG: list[ChatCompletionMessageParam] = [
    {"role": "user", "content": "Count from 1 to 200, one number per line."}
]


@pytest.fixture(scope="module")
def llama(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """One llama-server for the module (the model loads once); its URL."""
    log = tmp_path_factory.mktemp("llama") / "llama-server.log"
    with llama_server(log) as url:
        yield url


def client(url: str) -> openai.AsyncOpenAI:
    # No retries: a failed request must show, not be hidden by the SDK sending it again.
    return openai.AsyncOpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0)


def timings(reply: Any) -> dict[str, Any]:
    """llama.cpp's own `timings` object, an extra field beside OpenAI's."""
    extra: dict[str, Any] = reply.model_extra or {}
    found: dict[str, Any] = extra["timings"]
    return found


async def test_chat_answers_and_streams_through_the_pair(llama: str, tmp_path: Path):
    async with (
        pair_in_front(llama, tmp_path, max_output_tokens=CAP) as e,
        client(e.url) as sdk,
    ):
        reply = await sdk.chat.completions.create(model=MODEL, messages=LONG)
        assert reply.choices[0].message.content
        assert reply.usage is not None and 0 < reply.usage.completion_tokens <= CAP

        stream = await sdk.chat.completions.create(
            model=MODEL, messages=LONG, stream=True, stream_options={"include_usage": True}
        )
        pieces, usage = [], None
        async for chunk in stream:
            if chunk.choices and chunk.choices[0].delta.content:
                pieces.append(chunk.choices[0].delta.content)
            if chunk.usage is not None:
                usage = chunk.usage
        assert len(pieces) > 1  # token by token, not one block
        assert usage is not None and 0 < usage.completion_tokens <= CAP

        records = await e.records()
        assert [(r["status"], r["stream"]) for r in records] == [(200, False), (200, True)]
        # The edge's figures are the server's own count: a token can carry no text (a piece of
        # a multi-byte character, a special token), so the text pieces may be fewer.
        assert [r["tokens"] for r in records] == [
            reply.usage.completion_tokens,
            usage.completion_tokens,
        ]
        assert len(pieces) <= usage.completion_tokens


async def test_output_cap_holds_against_llamas_own_aliases(llama: str, tmp_path: Path):
    # Without the edge, llama.cpp writes past the cap (so the check below can fail): n_predict
    # is the field it obeys over max_tokens. `ignore_eos`: the small model may end its answer
    # before the cap (CI saw 8 tokens of 8), which would prove nothing either way.
    async with aiohttp.ClientSession() as http:
        body = {
            "model": MODEL,
            "messages": LONG,
            "max_tokens": CAP,
            "n_predict": 4 * CAP,
            "ignore_eos": True,
        }
        async with http.post(f"{llama}/v1/chat/completions", json=body) as r:
            direct = await r.json()
    assert direct["usage"]["completion_tokens"] > CAP

    async with (
        pair_in_front(llama, tmp_path, max_output_tokens=CAP) as e,
        client(e.url) as sdk,
    ):
        for field in ("n_predict", "max_tokens", "max_completion_tokens"):
            reply = await sdk.chat.completions.create(
                model=MODEL, messages=LONG, extra_body={field: 100_000}
            )
            assert reply.usage is not None and reply.usage.completion_tokens <= CAP, field
            assert timings(reply)["predicted_n"] <= CAP, field

            stream = await sdk.chat.completions.create(
                model=MODEL,
                messages=LONG,
                stream=True,
                stream_options={"include_usage": True},
                extra_body={field: 100_000},
            )
            last = [chunk async for chunk in stream][-1]
            assert last.usage is not None and last.usage.completion_tokens <= CAP, field
        records = await e.records()
        assert [r["status"] for r in records] == [200] * 6
        assert max(r["tokens"] for r in records) <= CAP


async def test_embeddings_through_the_pair(llama: str, tmp_path: Path):
    async with pair_in_front(llama, tmp_path) as e, client(e.url) as sdk:
        answer = await sdk.embeddings.create(model=MODEL, input=["a cat", "the stock market"])
        first, second = (item.embedding for item in answer.data)
        assert len(first) == len(second) == 576  # SmolLM2-135M's hidden size
        assert first != second
        assert [r["status"] for r in await e.records()] == [200]


async def test_mixed_requests_lose_none(llama: str, tmp_path: Path):
    # llama-server closes its connection after each streamed answer: the edge's pooled
    # connection to it is dead by the next request, which must still arrive (issue 16).
    count, concurrency = 200, 4
    async with (
        pair_in_front(llama, tmp_path, max_output_tokens=2, max_inflight=8) as e,
        client(e.url) as sdk,
    ):

        async def one(i: int) -> None:
            messages: list[ChatCompletionMessageParam] = [{"role": "user", "content": f"Say {i}."}]
            if i % 2:
                await sdk.chat.completions.create(model=MODEL, messages=messages)
                return
            stream = await sdk.chat.completions.create(model=MODEL, messages=messages, stream=True)
            chunks = [chunk async for chunk in stream]
            assert chunks[-1].choices[0].finish_reason is not None

        async def worker(first: int) -> None:
            for i in range(first, count, concurrency):
                await one(i)

        await asyncio.gather(*(worker(n) for n in range(concurrency)))
        records = await e.records()
        assert [r["status"] for r in records] == [200] * count


async def test_figures_are_llamas_own_and_ollama_routes_say_what_to_use(llama: str, tmp_path: Path):
    """A buffered answer's speed is llama.cpp's `predicted_per_second`, not its tokens over
    the whole upstream time; a stream's clock starts at its first token; an Ollama route on
    this OpenAI-only server is a 404 naming the /v1 route."""
    async with (
        pair_in_front(llama, tmp_path, max_output_tokens=CAP) as e,
        client(e.url) as sdk,
    ):
        raw = await sdk.chat.completions.with_raw_response.create(model=MODEL, messages=LONG)
        reply = raw.parse()
        own = timings(reply)
        assert float(raw.headers["X-Tok-Per-S"]) == pytest.approx(
            own["predicted_per_second"], rel=0.01
        )
        stream = await sdk.chat.completions.create(model=MODEL, messages=LONG, stream=True)
        async for _ in stream:
            pass
        async with aiohttp.ClientSession() as http:
            body = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}]}
            async with http.post(f"{e.url}/api/chat", json=body) as r:
                assert r.status == 404
                answer = await r.json()
        assert answer["type"] == "not_supported" and "/v1/chat/completions" in answer["error"]
        buffered, streamed = [r for r in await e.records() if r["route"] != "/api/chat"]
        assert buffered["speed_source"] == "server"
        assert buffered["gen_ms"] == pytest.approx(own["predicted_ms"], rel=0.01)
        assert streamed["ttft_ms"] is not None and 0 < streamed["ttft_ms"] <= streamed["elapsed_ms"]


async def test_json_mode_and_a_client_gone_stops_generation(llama: str, tmp_path: Path):
    """`response_format` reaches llama.cpp's grammar (the answer parses), and a client that
    leaves mid-stream frees the slot: llama-server's own /slots shows none still processing
    within 3 s, where the answer it left (2,048 tokens: `ignore_eos`, let through by
    `extra_fields`) would take tens of seconds more to finish on its own (SmolLM2 writes
    about 45 tokens a second here)."""
    async with (
        pair_in_front(llama, tmp_path, max_output_tokens=2048, extra_fields=["ignore_eos"]) as e,
        client(e.url) as sdk,
    ):
        reply = await sdk.chat.completions.create(
            model=MODEL,
            messages=[{"role": "user", "content": "Reply with a JSON object with key a."}],
            response_format={"type": "json_object"},
            max_tokens=64,
        )
        content = reply.choices[0].message.content or ""
        if reply.choices[0].finish_reason == "stop":  # not cut by the cap: whole JSON
            assert isinstance(orjson.loads(content), dict)
        else:
            assert content.lstrip().startswith("{")
        stream = await sdk.chat.completions.create(
            model=MODEL,
            messages=LONG,
            stream=True,
            max_tokens=2048,
            extra_body={"ignore_eos": True},
        )
        async for chunk in stream:
            if chunk.choices and chunk.choices[0].delta.content:
                break  # the first token: leave
        await stream.close()
        async with aiohttp.ClientSession() as http:
            async with asyncio.timeout(3):
                while True:
                    async with http.get(f"{llama}/slots") as r:
                        slots = await r.json()
                    if not any(slot.get("is_processing") for slot in slots):
                        break
                    await asyncio.sleep(0.1)  # llama.cpp has no event to wait on
        left = [r for r in await e.records() if r["stream"]]
        assert [r["outcome"] for r in left] == ["client_gone"]
