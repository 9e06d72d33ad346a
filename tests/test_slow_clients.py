"""Slow and stalled clients: none of them holds a GPU slot, none holds a connection forever.

The clients here are raw sockets, so they can do what no HTTP library does on purpose: trickle
headers or a body, or stop reading an answer. A socket that stops reading is not stalled at once:
the kernel's buffers (a few MB on loopback) take the answer first, so the answers here are larger.
"""

from __future__ import annotations

import asyncio
import socket
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import aiohttp
import orjson
from aiohttp import web

from tests.support.servers import edge, forwarded, serving, simulator

GEN = {"model": "llama3.2:1b", "prompt": "hi", "stream": False}


class RawClient:
    """One HTTP/1.1 connection driven by hand; it reads only when told to."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer

    @classmethod
    @asynccontextmanager
    async def connect(cls, url: str) -> AsyncIterator[RawClient]:
        host, port = url.removeprefix("http://").split(":")
        sock = socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # stall early
        sock.setblocking(False)
        await asyncio.get_running_loop().sock_connect(sock, (host, int(port)))
        # A small limit: asyncio stops reading the socket once 2 KiB wait unread.
        reader, writer = await asyncio.open_connection(sock=sock, limit=1024)
        try:
            yield cls(reader, writer)
        finally:
            writer.transport.abort()

    def send(self, data: bytes) -> None:
        self.writer.write(data)

    def request(self, path: str, body: dict[str, Any], request_id: str) -> bytes:
        payload = orjson.dumps(body)
        return (
            f"POST {path} HTTP/1.1\r\nHost: edge\r\nContent-Type: application/json\r\n"
            f"X-Request-Id: {request_id}\r\nContent-Length: {len(payload)}\r\n\r\n"
        ).encode() + payload

    async def read_head(self) -> bytes:
        return await self.reader.readuntil(b"\r\n\r\n")

    async def wait_closed_by_server(self) -> None:
        """Read (and drop) whatever comes until the server closes or resets the connection."""
        try:
            while await self.reader.read(65536):
                pass
        except ConnectionResetError:
            pass


class HeldStream:
    """An upstream whose streamed answer sends `bulk` bytes at once, then waits to be let go.

    Non-streamed requests are answered at once. `events` records what happened, in order.
    """

    LINE = orjson.dumps({"model": "m", "response": "x" * 80, "done": False}) + b"\n"

    def __init__(self, bulk: int) -> None:
        self.lines = bulk // len(self.LINE)
        self.finish = asyncio.Event()
        self.bulk_sent = asyncio.Event()
        self.cancelled = asyncio.Event()
        self.events: list[str] = []
        app = web.Application()
        app.router.add_get("/api/version", self._version)
        app.router.add_post("/api/generate", self._generate)
        self.app = app

    async def _version(self, request: web.Request) -> web.Response:
        return web.json_response({"version": "0.12.6"})

    async def _generate(self, request: web.Request) -> web.StreamResponse:
        body = await request.json()
        rid = request.headers["X-Request-Id"]
        self.events.append(f"{rid} arrived")
        if not body.get("stream"):
            return web.json_response(
                {"model": "m", "response": "ok", "done": True, "eval_count": 1}
            )
        response = web.StreamResponse(headers={"Content-Type": "application/x-ndjson"})
        await response.prepare(request)
        for _ in range(self.lines):
            await response.write(self.LINE)
        self.bulk_sent.set()
        try:
            await self.finish.wait()
        except asyncio.CancelledError:
            self.events.append(f"{rid} cancelled")  # the edge closed the connection
            self.cancelled.set()
            raise
        final = {"model": "m", "response": "", "done": True, "eval_count": 4321,
                 "eval_duration": 2_000_000_000, "prompt_eval_count": 3}  # fmt: skip
        await response.write(orjson.dumps(final) + b"\n")
        await response.write_eof()
        self.events.append(f"{rid} done")
        return response


async def test_stalled_reader_does_not_delay_the_next_request(
    tmp_path: Path, http: aiohttp.ClientSession
):
    """max_inflight=1: the next request gets the slot when the upstream ends, not the client."""
    held = HeldStream(bulk=6 * 1024 * 1024)  # past what the kernel buffers take
    async with serving(held.app) as url, edge(url, tmp_path, max_inflight=1) as e:
        g = e.edge.pool.gate
        async with asyncio.timeout(20), RawClient.connect(e.url) as slow:
            slow.send(slow.request("/api/generate", {**GEN, "stream": True}, "slow"))
            assert (await slow.read_head()).startswith(b"HTTP/1.1 200")
            # The client reads no further. The edge still takes the whole upstream answer.
            await held.bulk_sent.wait()

            async def call_next() -> int:
                headers = {"X-Request-Id": "next"}
                async with http.post(f"{e.url}/api/generate", json=GEN, headers=headers) as r:
                    return r.status

            async with asyncio.TaskGroup() as group:
                next_call = group.create_task(call_next())
                await g.wait_queued(1)  # "next" waits for the one slot...
                held.finish.set()  # ... which frees when the upstream ends
            assert next_call.result() == 200
            assert held.events == ["slow arrived", "slow done", "next arrived"]
            record = await e.record("next")
            assert record["status"] == 200 and record["queue_ms"] > 0
            # Meanwhile the slow client has still not read its answer: no line for it yet.
            assert [r["id"] for r in await e.records()] == ["next"]
            # Now it reads, and gets every byte, the final line included.
            lines = await read_chunked_ndjson(slow.reader)
        assert len(lines) == held.lines + 1
        assert lines[-1]["done"] is True
        record = await e.record("slow")
        assert record["outcome"] == "ok" and record["status"] == 200
        assert record["queue_ms"] == 0.0 and record["tokens"] == 4321
        assert record["tok_per_s"] == 2160.5  # 4321 tokens in the upstream's 2 s
        assert record["bytes_out"] > 6 * 1024 * 1024
        assert g.inflight == 0


async def test_client_gone_while_buffered_cancels_the_upstream(tmp_path: Path):
    """A client that fell behind (its chunks go through the buffer) and then leaves."""
    held = HeldStream(bulk=6 * 1024 * 1024)
    async with serving(held.app) as url, edge(url, tmp_path, max_inflight=1) as e:
        async with asyncio.timeout(20):
            async with RawClient.connect(e.url) as slow:
                slow.send(slow.request("/api/generate", {**GEN, "stream": True}, "left"))
                assert (await slow.read_head()).startswith(b"HTTP/1.1 200")
                await held.bulk_sent.wait()  # the upstream is still generating
            await held.cancelled.wait()
            await e.edge.pool.gate.wait_inflight(0)
            record = await e.wait_record("left")
    assert record["outcome"] == "client_gone"
    assert 0 < record["tokens"] <= held.lines  # the lines read before it left, one token each
    assert held.events == ["left arrived", "left cancelled"]


async def read_chunked_ndjson(reader: asyncio.StreamReader) -> list[dict[str, Any]]:
    """The rest of a chunked response body, as NDJSON lines."""
    body = bytearray()
    while True:
        size = int((await reader.readuntil(b"\r\n"))[:-2], 16)
        if size == 0:
            await reader.readuntil(b"\r\n")
            break
        body += await reader.readexactly(size)
        await reader.readexactly(2)
    return [orjson.loads(line) for line in body.splitlines()]


async def test_stalled_client_is_cut_and_its_generation_cancelled(tmp_path: Path):
    """A client that stops reading is cut after write_timeout; the upstream stops too."""
    async with (
        simulator(reply_tokens=100_000) as sim,
        edge(
            sim.url,
            tmp_path,
            max_inflight=1,
            max_output_tokens=100_000,
            stream_buffer_bytes=64 * 1024,  # fills long before the answer ends: back-pressure
            write_timeout=0.5,
        ) as e,
    ):
        body = {
            "model": "llama3.2:1b",
            "messages": [{"role": "user", "content": "hi"}],
            "stream": True,
        }  # about 22 MB of SSE
        async with asyncio.timeout(20), RawClient.connect(e.url) as slow:
            slow.send(slow.request("/v1/chat/completions", body, "stalled"))
            assert (await slow.read_head()).startswith(b"HTTP/1.1 200")
            await sim.stats.wait_cancelled(1)  # the generation was stopped
            await e.edge.pool.gate.wait_inflight(0)
            await slow.wait_closed_by_server()
        record = await e.record("stalled")
        assert record["outcome"] == "client_stalled" and record["status"] == 200
        assert 0 < record["tokens"] < 100_000  # the answer never ended: counted as it went
        assert record["stream"] is True and record["queue_ms"] == 0.0


async def test_stall_after_the_upstream_ended_is_cut_too(tmp_path: Path):
    held = HeldStream(bulk=6 * 1024 * 1024)
    async with (
        serving(held.app) as url,
        # The answer reaches the edge in milliseconds; the write timeout is far longer.
        edge(url, tmp_path, max_inflight=1, write_timeout=1.5) as e,
        asyncio.timeout(20),
        RawClient.connect(e.url) as slow,
    ):
        slow.send(slow.request("/api/generate", {**GEN, "stream": True}, "late"))
        assert (await slow.read_head()).startswith(b"HTTP/1.1 200")
        await held.bulk_sent.wait()
        held.finish.set()
        await e.edge.pool.gate.wait_inflight(0)  # the upstream ended; the slot is free
        record = await e.wait_record("late")  # reading now would end the stall
        await slow.wait_closed_by_server()  # cut, not left open for keep-alive
    assert record["outcome"] == "client_stalled" and record["status"] == 200
    assert record["tokens"] == 4321  # the answer was complete at the edge
    assert held.events == ["late arrived", "late done"]


async def test_stalled_reader_of_a_large_buffered_answer_is_cut(tmp_path: Path):
    """A non-streamed answer too large for the kernel's buffers, and a client that never reads."""
    answer = {"model": "m", "response": "x" * (6 * 1024 * 1024), "done": True, "eval_count": 5}

    async def version(request: web.Request) -> web.Response:
        return web.json_response({"version": "0.12.6"})

    async def generate(request: web.Request) -> web.Response:
        await request.read()
        return web.Response(body=orjson.dumps(answer), content_type="application/json")

    app = web.Application()
    app.router.add_get("/api/version", version)
    app.router.add_post("/api/generate", generate)
    async with (
        serving(app) as url,
        edge(url, tmp_path, max_inflight=1, write_timeout=0.5) as e,
        asyncio.timeout(20),
        RawClient.connect(e.url) as slow,
    ):
        slow.send(slow.request("/api/generate", GEN, "big"))
        assert (await slow.read_head()).startswith(b"HTTP/1.1 200")
        assert e.edge.pool.gate.inflight == 0  # the slot went before the answer was written
        record = await e.wait_record("big")
        await slow.wait_closed_by_server()
    assert record["outcome"] == "client_stalled" and record["status"] == 200
    assert record["tokens"] == 5 and record["stream"] is False


async def test_trickled_headers_are_cut_without_a_request(tmp_path: Path):
    async with (
        simulator() as sim,
        edge(sim.url, tmp_path, keepalive_timeout=0.5) as e,
        asyncio.timeout(10),
        RawClient.connect(e.url) as slow,
    ):
        slow.send(b"POST /api/generate HTTP/1.1\r\nHost: edge\r\n")

        async def trickle() -> None:
            while True:  # one header line every 50 ms: never a whole head
                slow.send(b"X-Trickle: 1\r\n")
                await asyncio.sleep(0.05)

        async with asyncio.TaskGroup() as group:
            trickler = group.create_task(trickle())
            await slow.wait_closed_by_server()
            trickler.cancel()
        assert e.edge.pool.gate.inflight == 0
        assert forwarded(sim) == []
        assert await e.records() == []  # no request ever began


async def test_trickled_body_is_408_and_never_takes_a_slot(
    tmp_path: Path, http: aiohttp.ClientSession
):
    async with (
        simulator() as sim,
        edge(sim.url, tmp_path, max_inflight=1, body_timeout=0.5) as e,
        asyncio.timeout(10),
        RawClient.connect(e.url) as slow,
    ):
        request = slow.request("/api/generate", GEN, "trickle")
        split = request.index(b"\r\n\r\n") + 4
        slow.send(request[:split])  # all headers, no body yet

        async def trickle(body: bytes) -> None:
            for i in range(len(body) - 1):  # one byte every 50 ms, never the last one
                slow.send(body[i : i + 1])
                await asyncio.sleep(0.05)

        async with asyncio.TaskGroup() as group:
            trickler = group.create_task(trickle(request[split:]))
            # While it trickles, the one slot is free for everyone else.
            async with http.post(
                f"{e.url}/api/generate", json=GEN, headers={"X-Request-Id": "other"}
            ) as r:
                assert r.status == 200
            head = await slow.read_head()
            trickler.cancel()
        assert head.startswith(b"HTTP/1.1 408")
        record = await e.record("trickle")
        assert record["status"] == 408 and record["type"] == "request_timeout"
        assert record["queue_ms"] is None  # it never reached the gate
        assert (await e.record("other"))["queue_ms"] == 0.0
        assert [s.headers["X-Request-Id"] for s in sim.stats.requests if s.method == "POST"] == [
            "other"
        ]
