"""Real servers on 127.0.0.1 port 0 for the tests: the edge, the simulator, broken upstreams.

No mocks: each is a real listener speaking real HTTP (or deliberately not speaking it).
"""

from __future__ import annotations

import asyncio
import socket
from collections import defaultdict
from collections.abc import AsyncIterator, Callable, Coroutine
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson
from aiohttp import web
from aiohttp.typedefs import Handler

from edge import services
from edge.app import create_app
from edge.exchange import EXCHANGE
from edge.http.protocol import EdgeRunner
from edge.settings import EdgeSettings
from edge.upstreams.agent import Agent
from edge.upstreams.sshd import EmbeddedSSHServer
from simulator.serve import RunningSimulator, SimulatorSettings, running_simulator, start_simulator


@asynccontextmanager
async def serving(app: web.Application) -> AsyncIterator[str]:
    """Run `app` on 127.0.0.1 port 0 as production does (the edge's runner serves any app);
    yield its base URL."""
    runner = EdgeRunner(app, handler_cancellation=True, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        await runner.cleanup()


def simulator(**settings: Any) -> AbstractAsyncContextManager[RunningSimulator]:
    """`simulator.serve.running_simulator` with its settings as keywords."""
    return running_simulator(SimulatorSettings(**settings))


@dataclass
class Edge:
    """A running edge: its URL, its application, and the objects it was built from."""

    url: str
    app: web.Application
    edge: services.Edge
    telemetry_path: Path
    # request id -> set once the edge's middleware has finished with it (its line is written)
    ended: defaultdict[str, asyncio.Event]

    @property
    def agent(self) -> Agent:
        """The pool's one agent (a test's single upstream, or the one agent connected)."""
        agents = list(self.edge.pool.agents.values())
        assert len(agents) == 1, agents
        return agents[0]

    @property
    def sshd(self) -> EmbeddedSSHServer:
        """The embedded SSH server (an edge started with `ssh_port`)."""
        assert self.edge.sshd is not None, "this edge runs without its SSH server"
        return self.edge.sshd

    async def records(self) -> list[dict[str, Any]]:
        """Every telemetry line written so far, parsed."""
        assert await self.edge.telemetry.wait_flushed()
        if not self.telemetry_path.exists():
            return []
        return [orjson.loads(line) for line in self.telemetry_path.read_bytes().splitlines()]

    async def record(self, request_id: str) -> dict[str, Any]:
        """The one telemetry line of `request_id` (asserting there is exactly one)."""
        lines = [r for r in await self.records() if r["id"] == request_id]
        assert len(lines) == 1, lines
        return lines[0]

    async def wait_record(self, request_id: str) -> dict[str, Any]:
        """`record()`, once the edge has finished with `request_id`: for a request whose client
        got its answer (or left) before the edge wrote the line. Unbounded: callers add a
        timeout."""
        await self.ended[request_id].wait()
        return await self.record(request_id)


@asynccontextmanager
async def edge(upstream: str, tmp_path: Path, **settings: Any) -> AsyncIterator[Edge]:
    path = tmp_path / "telemetry.jsonl"
    # Open (auth=none) unless a test asks for keys; state files in the test's own directory.
    settings.setdefault("auth", "none")
    settings.setdefault("keys_path", tmp_path / "keys.json")
    settings.setdefault("bans_path", tmp_path / "bans.json")
    settings.setdefault("budgets_path", tmp_path / "budgets.json")
    config = EdgeSettings(upstream=upstream, telemetry_path=path, **settings)
    async with services.open_edge(config) as built, _serving_edge(built, path) as running:
        yield running


@asynccontextmanager
async def _serving_edge(built: services.Edge, path: Path) -> AsyncIterator[Edge]:
    app = create_app(built)
    ended: defaultdict[str, asyncio.Event] = defaultdict(asyncio.Event)

    @web.middleware
    async def note_end(request: web.Request, handler: Handler) -> web.StreamResponse:
        # Outside the edge's own middleware: when this `finally` runs, that one's has written
        # the request's line, whether the request ended, failed or was cancelled.
        try:
            return await handler(request)
        finally:
            exchange = request.get(EXCHANGE)
            if exchange is not None:
                ended[exchange.id].set()

    app.middlewares.insert(0, note_end)
    async with serving(app) as url:
        yield Edge(url, app, built, path, ended)


class Workstation:
    """A simulator that can be stopped and started again on the same port: a model server
    that dies and comes back."""

    def __init__(self, *models: str, **settings: Any) -> None:
        self.settings = SimulatorSettings(models=models or SimulatorSettings().models, **settings)
        self.port = 0
        self.runner: web.AppRunner | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def start(self) -> None:
        self.runner, self.port = await start_simulator(self.settings, "127.0.0.1", self.port)

    async def stop(self) -> None:
        if self.runner is not None:
            await self.runner.cleanup()
            self.runner = None

    async def __aenter__(self) -> Workstation:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()


def forwarded(sim: RunningSimulator) -> list[str]:
    """The paths of the requests the edge sent the simulator for a client (each carries its
    `X-Request-Id`), leaving out the pool's own probes and looks at the models."""
    return [seen.path for seen in sim.stats.requests if "X-Request-Id" in seen.headers]


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
