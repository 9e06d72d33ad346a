"""The edge's embedded SSH server: what it grants, what it refuses, and the edge behind it."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import aiohttp
import asyncssh
import pytest

from edge.upstreams.sshd import CIPHER_ALGS, EmbeddedSSHServer
from simulator.serve import running_simulator
from tests.support import flood
from tests.support.refusals import assert_agent_unavailable_at_once
from tests.support.servers import free_port
from tests.support.sshd import (
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


async def test_grants_only_the_configured_forward_one_per_agent(tmp_path: Path):
    bind = free_port()
    key = make_key(tmp_path / "agent_key", "rtx-box")
    other_key = make_key(tmp_path / "other", "mac-mini")
    (tmp_path / "agent_keys").write_text(f"{public_line(key)}\n{public_line(other_key)}\n")
    async with embedded_server(tmp_path, bind) as vps, connect(vps, key) as conn:
        for host, port in (("127.0.0.1", free_port()), ("0.0.0.0", bind), ("localhost", bind)):
            with pytest.raises(asyncssh.ChannelListenError):
                await conn.forward_remote_port(host, port, "127.0.0.1", 9)
        assert vps.presence == []
        await conn.forward_remote_port("127.0.0.1", bind, "127.0.0.1", 9)
        async with asyncio.timeout(2):
            await vps.wait_present(True)
        with pytest.raises(asyncssh.ChannelListenError):  # one forward per connection
            await conn.forward_remote_port("127.0.0.1", bind, "127.0.0.1", 9)
        assert vps.urls == {"rtx-box": f"http://127.0.0.1:{bind}"}  # free: where it asked
        async with connect(vps, other_key) as other:
            # Another agent asks for the same address: it gets a forward of its own, elsewhere,
            # and the first keeps its own.
            await other.forward_remote_port("127.0.0.1", bind, "127.0.0.1", 9)
            async with asyncio.timeout(2):
                await vps.wait_present(True, "mac-mini")
            assert set(vps.server.holders) == {"rtx-box", "mac-mini"}
            assert vps.urls["mac-mini"] != vps.urls["rtx-box"]
            assert vps.urls["mac-mini"].startswith("http://127.0.0.1:")
        async with asyncio.timeout(2):
            await vps.wait_present(False, "mac-mini")
        assert vps.presence == [True, True, False]
        assert set(vps.server.holders) == {"rtx-box"}


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
        url = e.url
        server: EmbeddedSSHServer = e.sshd
        agent = agent_settings(
            tmp_path, server.port, f"127.0.0.1:{bind}", sim.url, pinned=server.host_public_key
        )
        async with running_tunnel(agent, up_within=5):
            assert e.agent.monitor.status.agent_present is True
            # Presence wakes the edge's probe; probing here makes "ready" deterministic.
            assert (await e.agent.monitor.probe(e.edge.sessions.pooled)).value == "up"
            headers = {"X-Request-Id": "through-the-tunnel"}
            async with http.post(f"{url}/api/generate", json=GEN, headers=headers) as r:
                assert r.status == 200
                assert (await r.json())["done"] is True
            record = await e.record("through-the-tunnel")
            assert record["status"] == 200
            assert record["outcome"] == "ok"
        # The agent is gone: presence drops with its connection, the next request is 503 now.
        status = e.agent.monitor.status  # read again: the tunnel has closed
        assert status.agent_present is False
        await assert_agent_unavailable_at_once(http, e, "agent-gone")


# Hardening (issue 8): old algorithms, the login timeout, and the caps at accept.


@pytest.mark.parametrize(
    "offer",
    [
        {"kex_algs": ["diffie-hellman-group14-sha1"]},
        {"kex_algs": ["diffie-hellman-group-exchange-sha1"]},
        # With a cipher that needs a MAC (an AEAD cipher would make the MAC moot).
        {"mac_algs": ["umac-64@openssh.com"], "encryption_algs": ["aes128-ctr"]},
        {"mac_algs": ["umac-64-etm@openssh.com"], "encryption_algs": ["aes128-ctr"]},
        {"mac_algs": ["hmac-sha1"], "encryption_algs": ["aes128-ctr"]},
        {"encryption_algs": ["aes128-cbc"]},
    ],
)
async def test_old_algorithms_are_refused(tmp_path: Path, offer: dict[str, list[str]]):
    key = authorize_agent(tmp_path)
    async with embedded_server(tmp_path, free_port()) as vps:
        with pytest.raises(asyncssh.KeyExchangeFailed):
            async with asyncssh.connect(
                "127.0.0.1",
                vps.port,
                username="anyone",
                client_keys=[key],
                known_hosts=([asyncssh.import_public_key(vps.server.host_public_key)], [], []),
                config=[],
                agent_path=None,
                **offer,
            ):
                pass
        async with connect(vps, key) as conn:  # a modern client still gets in
            assert conn.get_extra_info("recv_cipher") in CIPHER_ALGS


async def banner(port: int, source: str) -> bytes:
    """Connect from `source`: the server's version line, or b"" when it is refused at accept."""
    reader, writer = await flood.connect(port, source)
    try:
        async with asyncio.timeout(5):
            return await reader.readline()
    except ConnectionResetError:
        return b""
    finally:
        writer.close()


async def test_a_silent_client_is_dropped_after_the_login_timeout(tmp_path: Path):
    async with embedded_server(tmp_path, free_port(), ssh_login_timeout=0.5) as vps:
        reader, writer = await flood.connect(vps.port)
        try:
            async with asyncio.timeout(5):  # 20 s before: every idle connection held a slot
                assert (await reader.readline()).startswith(b"SSH-2.0-")
                while await reader.read(4096):
                    pass
        except ConnectionResetError:
            pass
        finally:
            writer.close()


async def test_one_address_is_capped_at_accept_and_the_agent_still_gets_in(tmp_path: Path):
    key = authorize_agent(tmp_path)
    settings: dict[str, Any] = {"ssh_max_startups_per_address": 3, "ssh_max_startups": "50"}
    async with embedded_server(tmp_path, free_port(), **settings) as vps:
        held = [await flood.connect(vps.port) for _ in range(3)]
        try:
            for reader, _ in held:
                assert (await reader.readline()).startswith(b"SSH-2.0-")
            assert await banner(vps.port, flood.ATTACKER) == b""  # refused before a byte
            async with connect(vps, key):  # from 127.0.0.1; logged in, it no longer counts:
                local = [await flood.connect(vps.port, "127.0.0.1") for _ in range(3)]
                try:
                    for reader, _ in local:
                        assert (await reader.readline()).startswith(b"SSH-2.0-")
                finally:
                    flood.close_all([w for _, w in local])
        finally:
            flood.close_all([w for _, w in held])
        assert vps.server.admission.refused["per_address"] == 1


async def test_unauthenticated_connections_are_capped_like_max_startups(tmp_path: Path):
    key = authorize_agent(tmp_path)
    async with embedded_server(tmp_path, free_port(), ssh_max_startups="3") as vps:
        held = [await flood.connect(vps.port, f"127.0.0.{n}") for n in (2, 3, 4)]
        try:
            for reader, _ in held:
                assert (await reader.readline()).startswith(b"SSH-2.0-")
            assert await banner(vps.port, "127.0.0.5") == b""  # a 4th from anywhere
            held.pop()[1].close()
            async with asyncio.timeout(5):
                await vps.server.admission.wait_open(2)
            async with connect(vps, key):  # once logged in, it no longer counts
                assert vps.server.admission.unauthenticated == 2
                assert (await banner(vps.port, "127.0.0.6")).startswith(b"SSH-2.0-")
        finally:
            flood.close_all([w for _, w in held])
        assert vps.server.admission.refused["startups"] == 1


async def test_handshakes_per_address_are_rate_limited(tmp_path: Path):
    settings: dict[str, Any] = {"ssh_handshake_rate": 0.001, "ssh_handshake_burst": 2}
    async with embedded_server(tmp_path, free_port(), **settings) as vps:
        assert (await banner(vps.port, flood.ATTACKER)).startswith(b"SSH-2.0-")
        assert (await banner(vps.port, flood.ATTACKER)).startswith(b"SSH-2.0-")
        assert await banner(vps.port, flood.ATTACKER) == b""  # none open, but too many started
        assert (await banner(vps.port, "127.0.0.1")).startswith(b"SSH-2.0-")
        assert vps.server.admission.refused["handshake_rate"] == 1
