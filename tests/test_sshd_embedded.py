"""The edge's embedded SSH server: what it grants, what it refuses, and the edge behind it."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import aiohttp
import asyncssh
import pytest

from agent.simulator import running_simulator
from edge.sshd import SSH_SERVER, EmbeddedSSHServer
from edge.state import SESSION, UPSTREAM
from tests.servers import free_port
from tests.sshd_fixtures import (
    GEN,
    EmbeddedVPS,
    agent_settings,
    authorize_agent,
    edge_with_sshd,
    embedded_server,
    make_key,
    public_line,
    running_tunnel,
    ssh_connect,
)


@asynccontextmanager
async def connect(
    vps: EmbeddedVPS, key: asyncssh.SSHKey
) -> AsyncIterator[asyncssh.SSHClientConnection]:
    # Any user name: the embedded server checks only the key.
    async with ssh_connect(vps.port, vps.server.host_public_key, key, "anyone") as conn:
        yield conn


async def test_host_key_is_made_on_first_start_and_kept(tmp_path: Path):
    bind = free_port()
    async with embedded_server(tmp_path, bind) as vps:
        first = vps.server.fingerprint
    key_file = tmp_path / "ssh_host_ed25519_key"
    assert key_file.stat().st_mode & 0o777 == 0o600
    assert (tmp_path / "ssh_host_ed25519_key.pub").read_text().startswith("ssh-ed25519 ")
    assert first.startswith("SHA256:")
    async with embedded_server(tmp_path, bind) as again:
        assert again.server.fingerprint == first


async def test_only_listed_keys_get_in_and_the_list_is_reread(tmp_path: Path):
    bind = free_port()
    listed = make_key(tmp_path / "listed")
    stranger = make_key(tmp_path / "stranger")
    (tmp_path / "agent_keys").write_text(f"# agents\n{public_line(listed)}\n")
    async with embedded_server(tmp_path, bind) as vps:
        async with connect(vps, listed):
            pass
        with pytest.raises(asyncssh.PermissionDenied):
            async with connect(vps, stranger):
                pass
        (tmp_path / "agent_keys").write_text(f"{public_line(listed)}\n{public_line(stranger)}\n")
        async with connect(vps, stranger):  # no restart needed
            pass
        (tmp_path / "agent_keys").unlink()
        with pytest.raises(asyncssh.PermissionDenied):  # unreadable file: nobody gets in
            async with connect(vps, listed):
                pass


async def test_refuses_shell_exec_subsystem_pty_and_direct_forwards(tmp_path: Path):
    bind = free_port()
    key = authorize_agent(tmp_path)
    async with embedded_server(tmp_path, bind) as vps, connect(vps, key) as conn:
        with pytest.raises(asyncssh.ChannelOpenError):
            await conn.run("id")
        with pytest.raises(asyncssh.ChannelOpenError):
            await conn.create_session(asyncssh.SSHClientSession)  # a shell
        with pytest.raises(asyncssh.ChannelOpenError):
            await conn.create_session(asyncssh.SSHClientSession, term_type="xterm")  # a PTY
        with pytest.raises(asyncssh.ChannelOpenError):
            await conn.start_sftp_client()  # a subsystem
        with pytest.raises(asyncssh.ChannelOpenError):
            await conn.open_connection("127.0.0.1", vps.port)  # direct-tcpip / -L
        with pytest.raises(asyncssh.ChannelOpenError):
            await conn.open_unix_connection("/run/docker.sock")
        with pytest.raises(asyncssh.ChannelListenError):
            await conn.start_unix_server(asyncssh.SSHUNIXSession, str(tmp_path / "sock"))
        assert conn.is_closed() is False  # refusals, not a disconnect


async def test_grants_only_the_configured_forward(tmp_path: Path):
    bind = free_port()
    key, other_key = make_key(tmp_path / "agent_key"), make_key(tmp_path / "other")
    (tmp_path / "agent_keys").write_text(f"{public_line(key)}\n{public_line(other_key)}\n")
    async with embedded_server(tmp_path, bind) as vps, connect(vps, key) as conn:
        for host, port in (("127.0.0.1", free_port()), ("0.0.0.0", bind), ("localhost", bind)):
            with pytest.raises(asyncssh.ChannelListenError):
                await conn.forward_remote_port(host, port, "127.0.0.1", 9)
        assert vps.presence == [False]
        await conn.forward_remote_port("127.0.0.1", bind, "127.0.0.1", 9)
        async with asyncio.timeout(2):
            await vps.wait_present(True)
        with pytest.raises(asyncssh.ChannelListenError):  # one forward per connection
            await conn.forward_remote_port("127.0.0.1", bind, "127.0.0.1", 9)
        async with connect(vps, other_key) as other:  # another agent key: the port is taken
            with pytest.raises(asyncssh.ChannelListenError):
                await other.forward_remote_port("127.0.0.1", bind, "127.0.0.1", 9)
        assert vps.presence[-1] is True


async def test_same_key_replaces_the_old_connection_and_frees_the_port_at_once(tmp_path: Path):
    bind = free_port()
    key = authorize_agent(tmp_path)
    async with embedded_server(tmp_path, bind) as vps, connect(vps, key) as old:
        await old.forward_remote_port("127.0.0.1", bind, "127.0.0.1", 9)
        async with connect(vps, key) as new:
            start = time.monotonic()
            await new.forward_remote_port("127.0.0.1", bind, "127.0.0.1", 9)
            assert time.monotonic() - start < 1.0
            async with asyncio.timeout(2):
                await old.wait_closed()
            assert vps.server.holder is not None
            assert vps.server.holder in vps.server.connections  # the new one: the old is gone
            assert len(vps.server.connections) == 1


async def test_request_through_the_edge_and_agent_gone_is_503_at_once(tmp_path: Path):
    bind = free_port()
    authorize_agent(tmp_path)
    async with (
        running_simulator() as sim,
        edge_with_sshd(bind, tmp_path) as e,
        aiohttp.ClientSession() as http,
    ):
        app, url = e.app, e.url
        server: EmbeddedSSHServer = app[SSH_SERVER]
        agent = agent_settings(
            tmp_path, server.port, f"127.0.0.1:{bind}", sim.url, pinned=server.host_public_key
        )
        async with running_tunnel(agent, up_within=5):
            assert app[UPSTREAM].status.agent_present is True
            # Presence wakes the edge's probe; probing here makes "ready" deterministic.
            assert (await app[UPSTREAM].probe(app[SESSION])).value == "up"
            headers = {"X-Request-Id": "through-the-tunnel"}
            async with http.post(f"{url}/api/generate", json=GEN, headers=headers) as r:
                assert r.status == 200
                assert (await r.json())["done"] is True
            record = await e.record("through-the-tunnel")
            assert record["status"] == 200
            assert record["outcome"] == "ok"
        # The agent is gone: presence drops with its connection, the next request is 503 now.
        assert app[UPSTREAM].status.agent_present is False
        start = time.monotonic()
        headers = {"X-Request-Id": "agent-gone"}
        async with http.post(f"{url}/api/generate", json=GEN, headers=headers) as r:
            assert r.status == 503
            assert (await r.json())["type"] == "agent_unavailable"
        assert time.monotonic() - start < 0.5
        assert (await e.record("agent-gone"))["type"] == "agent_unavailable"
