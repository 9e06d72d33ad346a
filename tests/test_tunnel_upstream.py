"""The agent's side of the model server: probe, warm-up, and what the edge sees when it is down."""

from __future__ import annotations

import asyncio
import socket
import time
from pathlib import Path

import aiohttp
import pytest
import structlog
from aiohttp import web
from aiohttp.typedefs import Handler

from agent.model_server import ModelServer
from agent.settings import AgentSettings
from agent.status import StatusBoard
from shared.errors import ConfigError
from shared.notify import Notifier
from simulator.serve import SimulatorSettings, running_simulator
from tests.support.servers import free_port, serving
from tests.support.sshd import agent_settings, authorize_agent, edge_with_sshd, running_tunnel

MODEL = "llama3.2:1b"


def settings_for(upstream: str, **overrides: object) -> AgentSettings:
    values: dict[str, object] = {
        "upstream": upstream,
        "probe_interval": 0.05,
        "probe_timeout": 1.0,
        "warm_models": [MODEL],
        "warm_keep_alive": "1h",
    }
    values.update(overrides)
    return AgentSettings(**values)  # type: ignore[arg-type]


async def test_warms_at_start_and_again_when_the_server_comes_back(tmp_path: Path):
    port = free_port()
    board = StatusBoard(tmp_path / "status.json")
    server = ModelServer(settings_for(f"http://127.0.0.1:{port}"), board)
    with structlog.testing.capture_logs() as logs:
        await _down_up_down_up_down(server, port)
    assert server.kind == "ollama"
    assert board.status.upstream_up is False
    assert board.status.warmed == [MODEL]
    # The agent's own words: on the edge, `upstream.*` is the tunnel's end, not the model server.
    events = [e["event"] for e in logs if e["event"].startswith(("model_server.", "upstream."))]
    changes = [e for e in events if e in ("model_server.up", "model_server.down")]
    # A new reason while down is logged again (a reset, then a refused connect): one run each.
    runs = [e for i, e in enumerate(changes) if i == 0 or changes[i - 1] != e]
    assert runs == ["model_server.down", "model_server.up"] * 2 + ["model_server.down"]
    assert events.count("model_server.warmed") == 2
    assert all(e.startswith("model_server.") for e in events)


async def _down_up_down_up_down(server: ModelServer, port: int) -> None:
    async with asyncio.TaskGroup() as tg:
        task = tg.create_task(server.run())
        async with asyncio.timeout(5):
            await server.wait_down()  # nothing listens yet
        assert server.reason is not None
        assert "connect failed" in server.reason
        for round_ in (1, 2):
            async with running_simulator(port=port) as sim:
                async with asyncio.timeout(5):
                    await server.wait_up()
                    await server.wait_warmed(round_)
                loads = [
                    r.body
                    for r in sim.stats.requests
                    if r.path == "/api/generate" and "prompt" not in (r.body or {})
                ]
                assert loads == [{"model": MODEL, "keep_alive": "1h"}]
            async with asyncio.timeout(5):
                await server.wait_down()
        task.cancel()


async def test_openai_only_servers_are_probed_on_v1_models_and_not_warmed():
    app = web.Application()

    async def models(_request: web.Request) -> web.Response:
        return web.json_response({"object": "list", "data": []})

    app.router.add_get("/v1/models", models)
    async with serving(app) as url:
        server = ModelServer(settings_for(url))
        async with aiohttp.ClientSession() as session:
            assert await server.probe(session) is True
            assert server.kind == "openai"
            assert await server.probe(session) is False  # already up: not "came up"


async def test_model_server_down_behind_a_live_tunnel_is_502_at_once(tmp_path: Path):
    bind, sim_port = free_port(), free_port()
    authorize_agent(tmp_path)
    body = {"model": MODEL, "prompt": "hi", "stream": False}
    async with (
        # probe_interval: the request itself must find out, not the probe
        edge_with_sshd(bind, tmp_path, probe_interval=60) as e,
        aiohttp.ClientSession() as http,
    ):
        url = e.url
        server = e.sshd
        upstream = f"http://127.0.0.1:{sim_port}"
        agent = agent_settings(
            tmp_path, server.port, f"127.0.0.1:{bind}", upstream, pinned=server.host_public_key
        )
        async with running_tunnel(agent, up_within=5):
            async with running_simulator(SimulatorSettings(), port=sim_port):
                assert (await e.agent.monitor.probe(e.edge.sessions.pooled)).value == "up"
                async with http.post(f"{url}/api/generate", json=body) as r:
                    assert r.status == 200
            # The agent is there, its model server is gone: the agent's connect is refused,
            # the channel is rejected, the edge's connection reset. No timeout anywhere.
            start = time.monotonic()
            async with http.post(f"{url}/api/generate", json=body) as r:
                assert r.status == 502
                assert (await r.json())["type"] == "upstream_unavailable"
            assert time.monotonic() - start < 1


async def test_notifier_speaks_the_sd_notify_datagram_protocol(tmp_path: Path):
    name = f"backhaul-test-{time.monotonic_ns()}"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(f"\0{name}")  # an abstract socket, as systemd's "@..." address
    sock.setblocking(False)
    notifier = Notifier(f"@{name}", watchdog_usec=100_000)
    assert notifier.watchdog_interval == 0.05
    loop = asyncio.get_running_loop()
    try:
        assert notifier.ready("tunnel up")
        assert await loop.sock_recv(sock, 4096) == b"READY=1\nSTATUS=tunnel up"
        assert notifier.status("line\nbreak")
        assert await loop.sock_recv(sock, 4096) == b"STATUS=line break"
        async with asyncio.TaskGroup() as tg:
            task = tg.create_task(notifier.run_watchdog())
            assert await loop.sock_recv(sock, 4096) == b"WATCHDOG=1"
            assert await loop.sock_recv(sock, 4096) == b"WATCHDOG=1"
            task.cancel()
        assert notifier.stopping()
        assert await loop.sock_recv(sock, 4096) == b"STOPPING=1"
    finally:
        notifier.close()
        sock.close()
    outside = Notifier(None, watchdog_usec=100_000)
    assert outside.send("READY=1") is False
    assert outside.watchdog_interval is None
    assert Notifier("/x", watchdog_usec=100_000, watchdog_pid=1).watchdog_interval is None


async def test_a_model_server_with_its_own_key_is_probed_and_warmed_with_it(tmp_path: Path):
    """vLLM started with `--api-key` refuses the agent's probe and warm-up without it (and
    checks it only under /v1); with `upstream_api_key_file` both carry it."""
    seen: list[tuple[str, str | None]] = []

    @web.middleware
    async def vllm(request: web.Request, handler: Handler) -> web.StreamResponse:
        seen.append((request.path, request.headers.get("Authorization")))
        if request.path.startswith("/v1") and request.headers.get("Authorization") != "Bearer k1":
            return web.json_response({"error": "Unauthorized"}, status=401)
        return await handler(request)

    async def models(request: web.Request) -> web.Response:
        return web.json_response({"object": "list", "data": [{"id": MODEL}]})

    async def chat(request: web.Request) -> web.Response:
        return web.json_response({"choices": []})

    app = web.Application(middlewares=[vllm])
    app.router.add_get("/v1/models", models)
    app.router.add_post("/v1/chat/completions", chat)
    key_file = tmp_path / "model-server.key"
    key_file.write_text("k1\n")
    async with serving(app) as url:
        refused = ModelServer(settings_for(url, warm_models=[]))
        async with asyncio.TaskGroup() as tg:
            task = tg.create_task(refused.run())
            async with asyncio.timeout(5):
                await refused.wait_down()
            task.cancel()
        assert refused.reason is not None and "401" in refused.reason
        keyed = ModelServer(settings_for(url, upstream_api_key_file=key_file))
        with structlog.testing.capture_logs() as logs:
            async with asyncio.TaskGroup() as tg:
                task = tg.create_task(keyed.run())
                async with asyncio.timeout(5):
                    await keyed.wait_up()
                task.cancel()
    assert keyed.kind == "openai"
    assert ("/v1/models", "Bearer k1") in seen
    assert "k1" not in repr(logs)


def test_an_unusable_key_file_stops_the_agent_at_start(tmp_path: Path):
    with pytest.raises(ConfigError, match="BACKHAUL_AGENT_UPSTREAM_API_KEY_FILE"):
        ModelServer(settings_for("http://127.0.0.1:9", upstream_api_key_file=tmp_path / "none"))
