"""The agent's loopback `/metrics`: the same facts as status.json, as Prometheus series."""

from __future__ import annotations

import asyncio
from pathlib import Path

import aiohttp

from agent.errors import ConnectFailed
from agent.metrics import metrics_server
from agent.status import StatusBoard
from tests.support.metrics import Samples, scrape
from tests.support.servers import free_port
from tests.support.sshd import agent_settings, authorize_agent, embedded_server, running_tunnel


async def scrape_agent(port: int) -> Samples:
    async with aiohttp.ClientSession() as http:
        return await scrape(http, f"http://127.0.0.1:{port}")


async def test_status_before_any_connection(tmp_path: Path):
    board = StatusBoard(None, warm_models=["llama3.2:1b"])
    async with metrics_server(board, 0) as port:
        m = await scrape_agent(port)
        assert m[("backhaul_agent_connected", frozenset())] == 0
        assert m[("backhaul_agent_reconnects_total", frozenset())] == 0
        # Not probed yet: no upstream sample rather than a false "down".
        assert not any(name == "backhaul_agent_upstream_up" for name, _ in m)
        assert m[("backhaul_agent_model_warm", frozenset({("model", "llama3.2:1b")}))] == 0
        board.tunnel_failed(ConnectFailed("connection refused"))
        board.model_server_up("ollama", "0.12.3")
        m = await scrape_agent(port)
        error = frozenset({("kind", "transient"), ("error", "connection refused")})
        assert m[("backhaul_agent_error_info", error)] == 1
        assert m[("backhaul_agent_upstream_up", frozenset())] == 1


async def test_connects_and_drops_of_a_real_tunnel(tmp_path: Path):
    bind = free_port()
    authorize_agent(tmp_path)
    async with embedded_server(tmp_path, bind) as vps:
        settings = agent_settings(
            tmp_path,
            vps.port,
            f"127.0.0.1:{bind}",
            "http://127.0.0.1:9",
            pinned=vps.server.host_public_key,
        )
        board = StatusBoard(tmp_path / "status.json")
        async with (
            metrics_server(board, 0) as port,
            running_tunnel(settings, board=board, up_within=5) as tunnel,
        ):
            m = await scrape_agent(port)
            assert m[("backhaul_agent_connected", frozenset())] == 1
            assert m[("backhaul_agent_connects_total", frozenset())] == 1
            vps.abort_all()  # the VPS end crashes: the agent notices and comes back
            async with asyncio.timeout(5):
                await tunnel.wait_down()
                await tunnel.wait_up()
            m = await scrape_agent(port)
            assert m[("backhaul_agent_connected", frozenset())] == 1
            assert m[("backhaul_agent_reconnects_total", frozenset())] == 1
            assert m[("backhaul_agent_last_disconnect_seconds", frozenset())] > 0
            reasons = [
                labels for name, labels in m if name == "backhaul_agent_last_disconnect_info"
            ]
            assert len(reasons) == 1
