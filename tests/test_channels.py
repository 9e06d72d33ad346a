"""The tunnel hop in-process (edge.upstreams.channels): in embedded mode the edge's client opens
the agent's SSH channel itself, not a socket to the agent's loopback listener.

Each test runs the real edge with its SSH server, the real agent (`Tunnel`) dialling it, and
the simulator behind the agent. The listener is closed first where it matters: what still
works then went through the channel, which the same tests through the old path would fail
(a refused connect, 503).
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import aiohttp
import pytest

from edge.upstreams.sshd import EmbeddedSSHServer
from tests.support.servers import free_port, simulator
from tests.support.sshd import GEN, agent_settings, authorize_agent, edge_with_sshd, running_tunnel


def _close_listener(server: EmbeddedSSHServer) -> str:
    """Close the one agent's loopback listener; its forward's URL."""
    (holder,) = server.holders.values()
    assert holder.listener is not None
    holder.listener.close()
    return f"http://127.0.0.1:{holder.listener.get_port()}"


async def test_requests_and_streams_go_through_the_channel_without_the_listener(
    tmp_path: Path, http: aiohttp.ClientSession
) -> None:
    bind = free_port()
    authorize_agent(tmp_path)
    async with (
        simulator(reply_tokens=40) as sim,
        edge_with_sshd(bind, tmp_path) as e,
    ):
        agent = agent_settings(
            tmp_path, e.sshd.port, f"127.0.0.1:{bind}", sim.url, pinned=e.sshd.host_public_key
        )
        async with running_tunnel(agent, up_within=5):
            forward = _close_listener(e.sshd)
            # Nothing listens there now: any other program on the VPS is refused.
            with pytest.raises(aiohttp.ClientConnectorError):
                await http.get(f"{forward}/api/version")
            headers = {"X-Request-Id": "in-process"}
            async with http.post(f"{e.url}/api/generate", json=GEN, headers=headers) as r:
                assert r.status == 200, await r.text()
                assert (await r.json())["done"] is True
            payload = {**GEN, "stream": True}
            async with http.post(f"{e.url}/api/generate", json=payload) as r:
                assert r.status == 200
                lines = [line async for line in r.content if line.strip()]
            assert len(lines) == 41 and b'"done":true' in lines[-1]
            record = await e.record("in-process")
            assert record["status"] == 200 and record["agent"] == e.agent.name
            assert record["upstream_retries"] == 0


async def test_a_client_gone_mid_stream_closes_the_channel_and_stops_the_generation(
    tmp_path: Path, http: aiohttp.ClientSession
) -> None:
    bind = free_port()
    authorize_agent(tmp_path)
    async with (
        simulator(reply_tokens=400, tok_per_s=50) as sim,
        edge_with_sshd(bind, tmp_path) as e,
    ):
        agent = agent_settings(
            tmp_path, e.sshd.port, f"127.0.0.1:{bind}", sim.url, pinned=e.sshd.host_public_key
        )
        async with running_tunnel(agent, up_within=5):
            _close_listener(e.sshd)
            payload = {**GEN, "stream": True}
            async with http.post(f"{e.url}/api/generate", json=payload) as r:
                assert r.status == 200
                await r.content.readline()  # generating
            # The client left: the edge closed the channel, the agent its socket, and the
            # model server saw its client go (as Ollama stops generating).
            async with asyncio.timeout(10):
                await sim.stats.wait_cancelled(1)
            async with asyncio.timeout(5):
                await e.edge.pool.gate.wait_inflight(0)


async def test_the_agent_gone_mid_answer_is_an_error_line_and_the_next_request_503(
    tmp_path: Path, http: aiohttp.ClientSession
) -> None:
    bind = free_port()
    authorize_agent(tmp_path)
    async with (
        simulator(reply_tokens=400, tok_per_s=50) as sim,
        edge_with_sshd(bind, tmp_path) as e,
    ):
        agent = agent_settings(
            tmp_path, e.sshd.port, f"127.0.0.1:{bind}", sim.url, pinned=e.sshd.host_public_key
        )
        payload = {**GEN, "stream": True}
        async with running_tunnel(agent, up_within=5):
            _close_listener(e.sshd)
            r = await http.post(f"{e.url}/api/generate", json=payload)
            assert r.status == 200
            await r.content.readline()
        # The tunnel ended with the stream half sent: the channel's end reaches the relay,
        # which ends the stream with an error line, then cuts it (never a clean end).
        lines: list[bytes] = []

        async def read_all() -> None:
            async with asyncio.timeout(10):
                while line := await r.content.readline():
                    lines.append(line)

        with pytest.raises(aiohttp.ClientPayloadError):
            await read_all()
        r.close()
        assert b'"type":"upstream_broken"' in lines[-1]
        assert len(lines) < 400
        async with http.post(f"{e.url}/api/generate", json=GEN) as r:
            assert r.status == 503
            assert (await r.json())["type"] == "agent_unavailable"
