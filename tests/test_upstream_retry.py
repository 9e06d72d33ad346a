"""A model server that closes its kept-alive connections costs clients nothing (issue 16).

The stand-in below is a raw HTTP/1.1 server, so the test decides exactly when a connection
closes. A close takes a moment to come back through the tunnel; a request the edge writes onto
the connection in that moment dies before any answer. The stand-in models that moment
(`close_travel_s`): once it has decided to close a connection, a request that arrives on it
before the close "arrived" is dropped unanswered, and the connection closed (or reset). The
last tests put it behind the whole pair, where the close travels through the real tunnel.
"""

from __future__ import annotations

import asyncio
import socket
import struct
from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import pytest

from tests.support.servers import Edge, edge, free_port
from tests.support.sshd import agent_process, authorize_agent, edge_with_sshd

GEN = {"model": "llama3.2:1b", "prompt": "hi"}
ANSWER = {"model": "llama3.2:1b", "response": "hi", "done": True, "eval_count": 2}
LINES = [
    {"model": "llama3.2:1b", "response": "h", "done": False},
    {"model": "llama3.2:1b", "response": "i", "done": False},
    {**ANSWER, "response": ""},
]
KEEP_ALIVE = b"Connection: keep-alive\r\nKeep-Alive: timeout=5\r\n"


@dataclass
class StandIn:
    """A model server's connection habits: what it closes, when, and how."""

    close_after_answer: bool = False  # llama-server: closes after every answer
    idle_close_s: float | None = None  # closes connections idle this long
    close_travel_s: float = 0.05  # how long its close takes to reach the edge
    reset: bool = False  # close with a reset (RST) rather than a FIN
    connection_close: bool = False  # answer `Connection: close`, then keep the socket open
    partial_answer: bytes = b""  # on a reused connection: send this much of an answer, then close
    reset_fresh: bool = False  # read each inference request, then reset, on any connection
    connections: int = 0
    answered: int = 0
    dropped: int = 0  # inference requests that arrived on a connection it was closing
    posts: int = 0  # inference requests read, on any connection

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        closing, served = False, 0
        try:
            while True:
                wait = self.close_travel_s if closing else self.idle_close_s
                try:
                    async with asyncio.timeout(wait):
                        head = await reader.readuntil(b"\r\n\r\n")
                except TimeoutError:
                    if closing:
                        return  # the close arrived with nothing crossing it
                    closing = True  # idle too long: it closes; the close is on its way
                    continue
                method, path, length = _parse(head)
                body = await reader.readexactly(length)
                self.posts += method == "POST"
                if closing or (self.reset_fresh and method == "POST"):
                    self.dropped += method == "POST"
                    return
                if self.partial_answer and served and method == "POST":
                    writer.write(self.partial_answer)
                    await writer.drain()
                    return
                writer.write(_answer(path, body, self.connection_close))
                await writer.drain()
                served += 1
                self.answered += method == "POST"
                closing = self.close_after_answer
        except (asyncio.IncompleteReadError, ConnectionError):
            return
        finally:
            if self.reset or self.reset_fresh:
                sock = writer.get_extra_info("socket")
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                writer.transport.abort()
            else:
                writer.close()


def _parse(head: bytes) -> tuple[str, str, int]:
    lines = head.decode("latin-1").split("\r\n")
    method, path, _ = lines[0].split(" ")
    length = 0
    for line in lines[1:]:
        name, _, value = line.partition(":")
        if name.strip().lower() == "content-length":
            length = int(value)
    return method, path, length


def _answer(path: str, body: bytes, connection_close: bool) -> bytes:
    connection = b"Connection: close\r\n" if connection_close else KEEP_ALIVE
    if path == "/api/version":
        return _json_answer(b'{"version":"0.12.6"}', connection)
    if path in ("/api/tags", "/api/ps"):  # what the pool asks of every model server
        return _json_answer(orjson.dumps({"models": [{"name": GEN["model"]}]}), connection)
    if not orjson.loads(body).get("stream"):
        return _json_answer(orjson.dumps(ANSWER), connection)
    chunks = b"".join(
        b"%x\r\n%s\r\n" % (len(line), line)
        for line in (orjson.dumps(x, option=orjson.OPT_APPEND_NEWLINE) for x in LINES)
    )
    return (
        b"HTTP/1.1 200 OK\r\nContent-Type: application/x-ndjson\r\n"
        + connection
        + b"Transfer-Encoding: chunked\r\n\r\n"
        + chunks
        + b"0\r\n\r\n"
    )


def _json_answer(payload: bytes, connection: bytes) -> bytes:
    return (
        b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
        + connection
        + (b"Content-Length: %d\r\n\r\n%s" % (len(payload), payload))
    )


@asynccontextmanager
async def stand_in(**habits: Any) -> AsyncIterator[tuple[StandIn, str]]:
    server_habits = StandIn(**habits)
    writers: list[asyncio.StreamWriter] = []

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writers.append(writer)
        await server_habits.handle(reader, writer)

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        yield server_habits, f"http://127.0.0.1:{port}"
    finally:
        for writer in writers:
            writer.transport.abort()
        server.close()
        await server.wait_closed()


@asynccontextmanager
async def edge_before(url: str, tmp_path: Path) -> AsyncIterator[Edge]:
    """The edge in front of `url`, probed once (so no probe races the requests), gate wide."""
    async with edge(url, tmp_path, probe_interval=60, max_inflight=8) as e:
        async with asyncio.timeout(5):  # its first probe and look at the models, then quiet
            await e.agent.refreshed.wait()
        assert e.agent.monitor.status.state.value == "up"
        yield e


@asynccontextmanager
async def edge_through_pair(url: str, tmp_path: Path) -> AsyncIterator[Edge]:
    """The whole pair in front of `url`: the edge with its SSH server, and the agent in its own
    process (as deployed) forwarding to `url`; probed once through the tunnel, gate wide."""
    bind = free_port()
    authorize_agent(tmp_path)
    async with (
        edge_with_sshd(bind, tmp_path, probe_interval=60, max_inflight=8) as e,
        # The agent's own probes (GETs) stay out of the way of the requests counted.
        agent_process(tmp_path, e.sshd, bind, url, probe_interval="60"),
    ):
        async with asyncio.timeout(5):  # its first probe and look at the models, then quiet
            await e.agent.refreshed.wait()
        assert e.agent.monitor.status.state.value == "up"
        yield e


# How the edge stands in front of the stand-in: alone, or with the tunnel between (below).
Front = Callable[[str, Path], AbstractAsyncContextManager[Edge]]


async def generate(http: aiohttp.ClientSession, e: Edge, i: int, *, stream: bool) -> int:
    """One request through the edge; its status (a streamed one must arrive whole)."""
    body = {**GEN, "stream": stream}
    async with http.post(
        f"{e.url}/api/generate", json=body, headers={"X-Request-Id": f"r{i}"}
    ) as r:
        raw = await r.read()
    if r.status == 200 and stream:
        assert [orjson.loads(x) for x in raw.splitlines()] == LINES
    elif r.status == 200:
        assert orjson.loads(raw) == ANSWER
    return r.status


async def run(http: aiohttp.ClientSession, e: Edge, count: int, concurrency: int) -> list[int]:
    """`count` requests, streamed and not in turn, `concurrency` at a time."""
    statuses: list[int] = []

    async def worker(first: int) -> None:
        for i in range(first, count, concurrency):
            statuses.append(await generate(http, e, i, stream=i % 2 == 0))

    await asyncio.gather(*(worker(n) for n in range(concurrency)))
    return statuses


def retries_metric(e: Edge) -> float:
    value = e.edge.metrics.registry.get_sample_value("backhaul_upstream_retries_total")
    return value or 0.0


async def assert_counted(e: Edge, server: StandIn, count: int) -> int:
    """Every request answered 200, computed once, its line written; the resends counted alike
    in the telemetry and the metric, one at least for each request the server dropped. Returns
    the count."""
    records = await e.records()
    assert len(records) == count
    assert {r["status"] for r in records} == {200}
    assert {r["outcome"] for r in records} == {"ok"}
    retries: int = sum(r["upstream_retries"] for r in records)
    assert max(r["upstream_retries"] for r in records) <= 1  # never twice
    # Every request the server dropped was resent; a request written just as the close arrived
    # dies in the socket (or, through the pair, in the tunnel) before the server counts it, so
    # resends may exceed the drops.
    assert retries >= server.dropped
    assert retries_metric(e) == retries
    assert server.answered == count
    return retries


@pytest.mark.parametrize("concurrency", [1, 8])
@pytest.mark.parametrize("reset", [False, True], ids=["close", "reset"])
async def test_server_closing_after_every_answer_costs_no_request(
    tmp_path: Path, http: aiohttp.ClientSession, concurrency: int, reset: bool
):
    async with (
        stand_in(close_after_answer=True, reset=reset) as (server, url),
        edge_before(url, tmp_path) as e,
    ):
        statuses = await run(http, e, 500, concurrency)
        assert statuses == [200] * 500
        retries = await assert_counted(e, server, 500)
        # Each reused connection was dead: about every other request was resent.
        assert retries >= 100


@pytest.mark.parametrize("concurrency", [1, 8])
@pytest.mark.parametrize(
    "front", [edge_before, edge_through_pair], ids=["direct", "through-the-pair"]
)
async def test_server_closing_idle_connections_costs_no_request(
    tmp_path: Path, http: aiohttp.ClientSession, concurrency: int, front: Front
):
    # The server gives an idle connection up after 1 s; its close takes 0.3 s to arrive (through
    # the pair, on top of the tunnel's own). The requests come in bursts 1.1 s apart, so each
    # burst meets the pooled connections closing.
    async with (
        stand_in(idle_close_s=1.0, close_travel_s=0.3) as (server, url),
        front(url, tmp_path) as e,
    ):
        statuses: list[int] = []
        for burst in range(4):
            if burst:
                await asyncio.sleep(1.1)
            statuses += await run(http, e, 125, concurrency)
        assert statuses == [200] * 500
        # At least one dead pooled connection met per burst after the first.
        assert await assert_counted(e, server, 500) >= 3


async def test_fresh_connection_reset_after_the_request_is_502_at_once(
    tmp_path: Path, http: aiohttp.ClientSession
):
    # `Connection: close` on the probe's answer: the request gets a connection of its own.
    async with stand_in(reset_fresh=True, connection_close=True) as (server, url):
        async with edge(url, tmp_path, probe_interval=60) as e:
            async with http.post(
                f"{e.url}/api/generate", json=GEN, headers={"X-Request-Id": "fresh"}
            ) as r:
                assert r.status == 502
                assert (await r.json())["type"] == "upstream_unavailable"
            record = await e.record("fresh")
        assert record["upstream_retries"] == 0
        assert server.dropped == 1  # sent once, never again
        assert retries_metric(e) == 0


async def test_no_resend_after_a_byte_of_the_answer(tmp_path: Path, http: aiohttp.ClientSession):
    # On the reused connection the server sends part of a status line, then closes: it had
    # started on the request, so it is not sent again.
    async with (
        stand_in(partial_answer=b"HTTP/1.1 20") as (server, url),
        edge_before(url, tmp_path) as e,
    ):
        async with http.post(
            f"{e.url}/api/generate", json=GEN, headers={"X-Request-Id": "partial"}
        ) as r:
            assert r.status == 502
        record = await e.record("partial")
        assert record["upstream_retries"] == 0
        # Read once: not sent again. (Connections are no witness: the failure wakes the probe,
        # which may open one of its own.)
        assert server.posts == 1


async def test_connection_close_from_the_server_is_honoured(
    tmp_path: Path, http: aiohttp.ClientSession
):
    # The server says `Connection: close` but leaves the socket open: the edge must not write
    # the next request onto it (the server would never read it).
    async with (
        stand_in(connection_close=True) as (server, url),
        edge_before(url, tmp_path) as e,
    ):
        before = server.connections  # the probes'
        statuses = await run(http, e, 20, 1)
        assert statuses == [200] * 20
        assert server.connections == before + 20  # one per request
        assert server.dropped == 0
        assert sum(r["upstream_retries"] for r in await e.records()) == 0


# Through the whole pair: the edge, its SSH server, the agent's process, the reverse forward. A
# close now really travels back through the tunnel (a FIN to the agent, a channel EOF and close
# over SSH, the edge's end of the forward closed), and a request dies on the way in as it would
# in production, possibly in the tunnel before it reaches the server (the agent's socket to it
# is closed), so only the edge's count of resends is exact; the server's drops are a floor.
#
# The agent runs in its own process because with the whole pair in one event loop the close
# always won (0 resends in 500, sequential or c=8): the edge learnt of it before it handed the
# connection to another request. Across processes a concurrent request meets the close in
# flight for real (nothing modelled: `close_travel_s=0`). A sequential client, or a
# burst after an idle close, never does on loopback, where the close crosses in well under a
# millisecond: those cases model the moment (`close_travel_s`) so that they can fail.


@pytest.mark.parametrize(
    ("concurrency", "close_travel_s"),
    [(8, 0.0), (1, 0.05), (8, 0.05)],
    ids=["concurrent", "sequential-modelled", "concurrent-modelled"],
)
async def test_server_closing_after_every_answer_through_the_pair(
    tmp_path: Path, http: aiohttp.ClientSession, concurrency: int, close_travel_s: float
):
    async with (
        stand_in(close_after_answer=True, close_travel_s=close_travel_s) as (server, url),
        edge_through_pair(url, tmp_path) as e,
    ):
        statuses = await run(http, e, 500, concurrency)
        assert statuses == [200] * 500
        retries = await assert_counted(e, server, 500)
        # With the close modelled, every other request meets it: resent. With nothing modelled
        # the race is real and rare: 8 to 67 resends in 500 when the edge reached the agent
        # through its loopback listener (and 18 to 102 502s without the resend), 0 to a few
        # since it opens the channel in-process (issue 15), which learns of a close sooner.
        # All 500 answered is what holds either way.
        if close_travel_s:
            assert retries >= 100
