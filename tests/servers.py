"""Real servers on 127.0.0.1 port 0 for the tests: the edge, the simulator, broken upstreams.

No mocks: each is a real listener speaking real HTTP (or deliberately not speaking it).
"""

from __future__ import annotations

import asyncio
import socket
from collections.abc import AsyncIterator, Callable, Coroutine
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson
from aiohttp import web

from agent.simulator import RunningSimulator, SimulatorSettings, running_simulator
from edge.app import create_app
from edge.settings import EdgeSettings
from edge.state import TELEMETRY


@asynccontextmanager
async def serving(app: web.Application) -> AsyncIterator[str]:
    """Run `app` on 127.0.0.1 port 0 as production does; yield its base URL."""
    runner = web.AppRunner(app, handler_cancellation=True, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    server = site._server
    assert isinstance(server, asyncio.base_events.Server)
    port = server.sockets[0].getsockname()[1]
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        await runner.cleanup()


def simulator(**settings: Any) -> AbstractAsyncContextManager[RunningSimulator]:
    """`agent.simulator.running_simulator` with its settings as keywords."""
    return running_simulator(SimulatorSettings(**settings))


@dataclass
class Edge:
    url: str
    app: web.Application
    telemetry_path: Path

    async def records(self) -> list[dict[str, Any]]:
        """Every telemetry line written so far, parsed."""
        assert await self.app[TELEMETRY].wait_flushed()
        if not self.telemetry_path.exists():
            return []
        return [orjson.loads(line) for line in self.telemetry_path.read_bytes().splitlines()]

    async def record(self, request_id: str) -> dict[str, Any]:
        """The one telemetry line of `request_id` (asserting there is exactly one)."""
        lines = [r for r in await self.records() if r["id"] == request_id]
        assert len(lines) == 1, lines
        return lines[0]


@asynccontextmanager
async def edge(upstream: str, tmp_path: Path, **settings: Any) -> AsyncIterator[Edge]:
    path = tmp_path / "telemetry.jsonl"
    # Open (auth=none) unless a test asks for keys; state files in the test's own directory.
    settings.setdefault("auth", "none")
    settings.setdefault("keys_path", tmp_path / "keys.json")
    settings.setdefault("bans_path", tmp_path / "bans.json")
    config = EdgeSettings(upstream=upstream, telemetry_path=path, **settings)
    app = create_app(config)
    async with serving(app) as url:
        yield Edge(url, app, path)


def free_port() -> int:
    """A loopback port nothing listens on (bound, then released): connecting is refused."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


@asynccontextmanager
async def raw_server(
    on_connect: Callable[[asyncio.StreamReader, asyncio.StreamWriter], Coroutine[Any, Any, None]],
) -> AsyncIterator[str]:
    """A TCP server that does whatever `on_connect` does: reset, stay silent, half an answer."""
    writers: list[asyncio.StreamWriter] = []

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writers.append(writer)
        await on_connect(reader, writer)

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        for writer in writers:
            writer.transport.abort()
        server.close()
        await server.wait_closed()
