"""An answer's figures mean the same on every model server (issue 10).

Speed is the model server's own decode speed where it reports one (Ollama's `eval_duration`,
llama.cpp's `timings`), else the edge's measure from the first generated token, and the record
says which (`speed_source`). `ttft_ms` is the time to the first generated token of a stream.

The stand-in below answers in llama.cpp's wire format (tools/server/server-task.cpp:
`to_json_oaicompat_chat` and `to_json_oaicompat_chat_stream`, `result_timings::to_json`): a
non-streamed answer with `usage` and `timings`; a stream that opens with `: ping` comments
(what llama-server sends while it reads a long prompt or waits for a slot), a role chunk with
`"content": null`, one chunk per token, a finish chunk with `"delta": {}`, a usage chunk with
no choices if asked, `timings` on the last of them, and `data: [DONE]`. It is a raw HTTP server
so the test decides when each byte leaves.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import pytest

from tests.support.metrics import scrape, value
from tests.support.servers import Edge, edge, raw_server, simulator

MODEL = "smollm2"
CHAT = {"model": MODEL, "messages": [{"role": "user", "content": "why is the sky blue"}]}
TOKENS = ["Ray", "leigh", " scattering", "."]
# llama.cpp's own figures for the answer: 600 prompt tokens (8 from its cache) read in 300 ms,
# the 4 tokens decoded in 100 ms. None of them can come from the edge's clock.
TIMINGS = {
    "cache_n": 8,
    "prompt_n": 592,
    "prompt_ms": 300.0,
    "prompt_per_token_ms": 0.5067567567567568,
    "prompt_per_second": 1973.3333333333333,
    "predicted_n": 4,
    "predicted_ms": 100.0,
    "predicted_per_token_ms": 25.0,
    "predicted_per_second": 40.0,
}
USAGE = {"completion_tokens": 4, "prompt_tokens": 600, "total_tokens": 604}
PINGS = 3
PING_GAP_S = 0.1  # the prompt "takes" PINGS * PING_GAP_S before the first token


def _head(content_type: bytes, length: int | None = None) -> bytes:
    framing = (
        b"Content-Length: %d" % length if length is not None else b"Transfer-Encoding: chunked"
    )
    return (
        b"HTTP/1.1 200 OK\r\nServer: llama.cpp\r\nContent-Type: "
        + content_type
        + b"\r\nConnection: close\r\n"
        + framing
        + b"\r\n\r\n"
    )


def _chunk(data: bytes) -> bytes:
    return b"%x\r\n%s\r\n" % (len(data), data)


def _sse(obj: dict[str, Any]) -> bytes:
    return b"data: " + orjson.dumps(obj) + b"\n\n"


def _chunk_object(choices: list[Any]) -> dict[str, Any]:
    return {
        "choices": choices,
        "created": 1764662400,
        "id": "chatcmpl-3f2a9c1e",
        "model": MODEL,
        "system_fingerprint": "b7200-0a1b2c3d",
        "object": "chat.completion.chunk",
    }


def _delta(delta: dict[str, Any], finish: str | None = None) -> dict[str, Any]:
    return _chunk_object([{"finish_reason": finish, "index": 0, "delta": delta}])


def stream_events(include_usage: bool, timings: bool = True) -> list[bytes]:
    """The SSE events after the pings, as llama.cpp writes them."""
    events = [_sse(_delta({"role": "assistant", "content": None}))]
    events += [_sse(_delta({"content": token})) for token in TOKENS]
    last = _delta({}, "stop")
    if include_usage:
        events.append(_sse(last))
        last = {**_chunk_object([]), "usage": USAGE}
    if timings:
        last = {**last, "timings": TIMINGS}
    events.append(_sse(last))
    return [*events, b"data: [DONE]\n\n"]


def whole_answer(timings: bool = True) -> dict[str, Any]:
    """A non-streamed `chat.completion` as llama.cpp writes it."""
    answer: dict[str, Any] = {
        "choices": [
            {
                "finish_reason": "stop",
                "index": 0,
                "message": {"role": "assistant", "content": "".join(TOKENS)},
            }
        ],
        "created": 1764662400,
        "model": MODEL,
        "system_fingerprint": "b7200-0a1b2c3d",
        "object": "chat.completion",
        "usage": USAGE,
        "id": "chatcmpl-3f2a9c1e",
    }
    if timings:
        answer["timings"] = TIMINGS
    return answer


@dataclass
class LlamaStandIn:
    """llama-server's answers, with the times (the test's own clock) when its bytes left."""

    timings: bool = True  # False: a server that reports no timings (vLLM, Ollama's /v1)
    received: float = 0.0  # when the request had arrived
    first_token_sent: float = 0.0
    paths: list[str] = field(default_factory=list)

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            head = await reader.readuntil(b"\r\n\r\n")
            path, length = _parse(head)
            body = orjson.loads(await reader.readexactly(length)) if length else {}
            self.received = time.perf_counter()
            self.paths.append(path)
            if path != "/v1/chat/completions":
                error = {"code": 404, "message": "File Not Found", "type": "not_found_error"}
                payload = orjson.dumps({"error": error})
                writer.write(
                    _head(b"application/json; charset=utf-8", len(payload)).replace(
                        b"200 OK", b"404 Not Found"
                    )
                    + payload
                )
            elif not body.get("stream"):
                payload = orjson.dumps(whole_answer(self.timings))
                writer.write(_head(b"application/json; charset=utf-8", len(payload)) + payload)
            else:
                await self._stream(writer, body)
            await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            return
        finally:
            writer.close()

    async def _stream(self, writer: asyncio.StreamWriter, body: dict[str, Any]) -> None:
        writer.write(_head(b"text/event-stream"))
        for _ in range(PINGS):  # the prompt is being read
            writer.write(_chunk(b": ping\n\n"))
            await writer.drain()
            await asyncio.sleep(PING_GAP_S)
        include_usage = (body.get("stream_options") or {}).get("include_usage") is True
        events = stream_events(include_usage, self.timings)
        writer.write(_chunk(events[0]))  # the role: no token yet
        await writer.drain()
        self.first_token_sent = time.perf_counter()
        for event in events[1:]:
            writer.write(_chunk(event))
            await writer.drain()
        writer.write(b"0\r\n\r\n")


def _parse(head: bytes) -> tuple[str, int]:
    lines = head.decode("latin-1").split("\r\n")
    path = lines[0].split(" ")[1]
    length = 0
    for line in lines[1:]:
        name, _, text = line.partition(":")
        if name.strip().lower() == "content-length":
            length = int(text)
    return path, length


@asynccontextmanager
async def llama_edge(
    tmp_path: Path, timings: bool = True
) -> AsyncIterator[tuple[LlamaStandIn, Edge]]:
    stand_in = LlamaStandIn(timings=timings)
    async with raw_server(stand_in.handle) as url, edge(url, tmp_path, probe_interval=60) as e:
        yield stand_in, e


async def test_non_streamed_speed_is_the_servers_own(tmp_path: Path, http: aiohttp.ClientSession):
    """Not the tokens over the whole upstream time, which holds the prompt's reading too."""
    async with llama_edge(tmp_path) as (_, e):
        headers = {"X-Request-Id": "whole"}
        async with http.post(f"{e.url}/v1/chat/completions", json=CHAT, headers=headers) as r:
            assert r.status == 200
            assert await r.json() == whole_answer()
        assert r.headers["X-Tok-Per-S"] == "40.00"
        assert r.headers["X-Tokens"] == "4"
        record = await e.record("whole")
        assert record["tok_per_s"] == 40.0 and record["gen_ms"] == 100.0
        assert record["speed_source"] == "server"
        assert (record["tokens"], record["prompt_tokens"]) == (4, 600)
        # The edge cannot see the first token of a buffered answer: the server's prompt time.
        assert record["ttft_ms"] == 300.0


async def test_non_streamed_without_timings_is_labelled_measured(
    tmp_path: Path, http: aiohttp.ClientSession
):
    async with llama_edge(tmp_path, timings=False) as (_, e):
        headers = {"X-Request-Id": "plain"}
        async with http.post(f"{e.url}/v1/chat/completions", json=CHAT, headers=headers) as r:
            assert r.status == 200
        record = await e.record("plain")
        assert record["speed_source"] == "measured" and record["tok_per_s"] > 0
        assert float(r.headers["X-Tok-Per-S"]) == record["tok_per_s"]
        assert record["ttft_ms"] is None  # no figure of the server's, and no token seen


@pytest.mark.parametrize("include_usage", [False, True], ids=["no_usage", "include_usage"])
async def test_streamed_figures_come_from_the_last_chunks_timings(
    tmp_path: Path, http: aiohttp.ClientSession, include_usage: bool
):
    """Without `include_usage` the count and the prompt come from `timings` too."""
    body = {**CHAT, "stream": True}
    if include_usage:
        body["stream_options"] = {"include_usage": True}
    async with llama_edge(tmp_path) as (stand_in, e):
        headers = {"X-Request-Id": "stream"}
        async with http.post(f"{e.url}/v1/chat/completions", json=body, headers=headers) as r:
            assert r.status == 200
            raw = await r.read()
        # Relayed unchanged, pings included.
        assert raw == b": ping\n\n" * PINGS + b"".join(stream_events(include_usage))
        record = await e.record("stream")
        assert (record["tokens"], record["prompt_tokens"]) == (4, 600)
        assert record["tok_per_s"] == 40.0 and record["gen_ms"] == 100.0
        assert record["speed_source"] == "server"
        # The first token left the stand-in after every ping: the edge saw it no sooner.
        assert record["ttft_ms"] >= (stand_in.first_token_sent - stand_in.received) * 1000.0


async def test_pings_do_not_start_the_generation_clock(tmp_path: Path, http: aiohttp.ClientSession):
    """A server without timings: speed is measured from the first token, not the first ping."""
    body = {**CHAT, "stream": True}
    async with llama_edge(tmp_path, timings=False) as (stand_in, e):
        headers = {"X-Request-Id": "pinged"}
        async with http.post(f"{e.url}/v1/chat/completions", json=body, headers=headers) as r:
            assert r.status == 200
            await r.read()
        done = time.perf_counter()
        record = await e.record("pinged")
        assert record["tokens"] == len(TOKENS) and record["speed_source"] == "measured"
        # The edge's clock ran from the first token to the upstream's end, which came before
        # the client's: no longer than that; the pings before it are the time to first token.
        assert record["gen_ms"] <= (done - stand_in.first_token_sent) * 1000.0
        assert record["ttft_ms"] >= (stand_in.first_token_sent - stand_in.received) * 1000.0
        # Both figures come from one clock; gen_ms is rounded to the microsecond, which on a
        # fast stand-in (tens of µs for every token) is more than 1%: allow for that rounding.
        slowest = len(TOKENS) / (record["gen_ms"] + 0.0005) * 1000
        fastest = len(TOKENS) / max(record["gen_ms"] - 0.0005, 1e-9) * 1000
        assert slowest - 0.01 <= record["tok_per_s"] <= fastest + 0.01


async def test_ttft_is_in_the_metrics(tmp_path: Path, http: aiohttp.ClientSession):
    async with llama_edge(tmp_path) as (_, e):
        for rid, stream in (("streamed", True), ("buffered", False)):
            body, headers = {**CHAT, "stream": stream}, {"X-Request-Id": rid}
            async with http.post(f"{e.url}/v1/chat/completions", json=body, headers=headers) as r:
                await r.read()
            async with asyncio.timeout(5):  # counted once the edge has finished with it
                assert (await e.wait_record(rid))["ttft_ms"] is not None
        samples = await scrape(http, e.url)
    route = "/v1/chat/completions"
    assert value(samples, "backhaul_upstream_ttft_seconds_count", route=route) == 2


async def test_ollamas_own_figures_are_the_servers(tmp_path: Path, http: aiohttp.ClientSession):
    """Ollama's native answers carry eval_count/eval_duration: speed and ttft from them."""
    body = {"model": "llama3.2:1b", "prompt": "hi", "stream": False}
    async with simulator(reply_tokens=12) as sim, edge(sim.url, tmp_path) as e:
        headers = {"X-Request-Id": "native"}
        async with http.post(f"{e.url}/api/generate", json=body, headers=headers) as r:
            answer = await r.json()
        record = await e.record("native")
        expected = answer["eval_count"] / answer["eval_duration"] * 1e9
        assert float(r.headers["X-Tok-Per-S"]) == pytest.approx(expected, abs=0.01)
        assert record["speed_source"] == "server"
        assert record["ttft_ms"] == pytest.approx(answer["prompt_eval_duration"] / 1e6, abs=0.001)
