"""The agent's tunnel against the edge's embedded SSH server, in process: the fast tier.

Every wait is on an event (`wait_up`, `wait_down`, presence) bounded by `asyncio.timeout`; the
bounds are the ones the design promises (backoff, keepalive), plus scheduling slack.
"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

from agent.errors import ForwardMisconfigured, HostKeyRejected, Replaced
from agent.status import StatusBoard
from simulator.serve import running_simulator
from tests.support.servers import free_port
from tests.support.sshd import (
    HalfOpenRelay,
    agent_settings,
    authorize_agent,
    embedded_server,
    generate_via,
    make_key,
    pin,
    public_line,
    running_tunnel,
)

SLACK_S = 1.0  # scheduling slack on this 2-core machine


async def test_forward_carries_requests_and_reports_presence(tmp_path: Path):
    bind = free_port()
    async with running_simulator() as sim, embedded_server(tmp_path, bind) as vps:
        authorize_agent(tmp_path)
        settings = agent_settings(
            tmp_path, vps.port, f"127.0.0.1:{bind}", sim.url, pinned=vps.server.host_public_key
        )
        async with running_tunnel(settings) as tunnel:
            async with asyncio.timeout(5):
                await tunnel.wait_up()
                await vps.wait_present(True)
            assert tunnel.cipher == "aes128-gcm@openssh.com"  # half chacha20's cost in asyncssh
            r = await generate_via(bind)
            assert r.status == 200
            assert (await r.json())["done"] is True
        async with asyncio.timeout(2):  # the tunnel task was cancelled: the agent left
            await vps.wait_present(False)
    assert vps.presence == [True, False]


async def test_server_crash_and_restart_back_up_within_the_backoff_bound(tmp_path: Path):
    bind = free_port()
    authorize_agent(tmp_path)
    async with running_simulator() as sim, embedded_server(tmp_path, bind) as vps:
        port = vps.port
        settings = agent_settings(
            tmp_path, port, f"127.0.0.1:{bind}", sim.url, pinned=vps.server.host_public_key
        )
        async with running_tunnel(settings, up_within=5) as tunnel:
            # The connection aborted under it: back after at most one jittered initial delay
            # (stable_after=0, so the session counted as healthy and the backoff restarted).
            vps.abort_all()
            async with asyncio.timeout(2):
                await tunnel.wait_down()
            down = time.monotonic()
            async with asyncio.timeout(settings.backoff_initial + SLACK_S):
                await tunnel.wait_up()
            assert time.monotonic() - down < settings.backoff_initial + SLACK_S
            assert tunnel.last_down_reason  # the transport's words; asyncssh: "Connection lost"

            # The whole server restarted on the same port (same host key file): refused
            # connects back off up to the cap, then the first attempt after it is back works.
            await vps.server.close()
            async with asyncio.timeout(2):
                await tunnel.wait_down()
            async with embedded_server(tmp_path, bind, port=port) as again:
                restarted = time.monotonic()
                async with asyncio.timeout(settings.backoff_max + SLACK_S):
                    await tunnel.wait_up()
                    await again.wait_present(True)
                assert time.monotonic() - restarted < settings.backoff_max + SLACK_S
            assert tunnel.connects == 3


async def test_half_open_path_is_detected_within_the_keepalive_bound(tmp_path: Path):
    bind = free_port()
    authorize_agent(tmp_path)
    async with (
        running_simulator() as sim,
        embedded_server(tmp_path, bind, ssh_keepalive_interval=5.0) as vps,
        HalfOpenRelay(vps.port) as relay,
    ):
        settings = agent_settings(
            tmp_path,
            relay.port,
            f"127.0.0.1:{bind}",
            sim.url,
            pinned=vps.server.host_public_key,
            keepalive_interval=0.2,
            keepalive_count_max=2,
        )
        bound = settings.keepalive_interval * (settings.keepalive_count_max + 1)
        async with running_tunnel(settings, up_within=5) as tunnel:
            relay.blackhole()
            silenced = time.monotonic()
            async with asyncio.timeout(bound + SLACK_S):
                await tunnel.wait_down()
            detected = time.monotonic() - silenced
            assert detected <= bound + SLACK_S
            assert "keepalive" in str(tunnel.last_down_reason)
            # The embedded server has not noticed yet (its keepalive is 5 s), but the new
            # connection with the same key replaces the silent one at once: no stale bind.
            async with asyncio.timeout(2):
                await tunnel.wait_up()
            assert (await generate_via(bind)).status == 200


async def test_wrong_host_key_is_permanent_and_never_hammers(tmp_path: Path):
    bind = free_port()
    authorize_agent(tmp_path)
    impostor = make_key(tmp_path / "impostor")
    delays: list[float] = []
    third = asyncio.Event()

    async def sleep(delay: float) -> None:
        delays.append(delay)
        if len(delays) >= 3:
            third.set()
            await asyncio.Event().wait()  # stay parked: the test has what it needs

    async with embedded_server(tmp_path, bind) as vps:
        settings = agent_settings(
            tmp_path,
            vps.port,
            f"127.0.0.1:{bind}",
            "http://127.0.0.1:9",
            pinned=public_line(impostor),
        )
        board = StatusBoard(tmp_path / "status.json")
        async with running_tunnel(settings, board=board, sleep=sleep) as tunnel:
            async with asyncio.timeout(5):
                await third.wait()
            assert isinstance(tunnel.last_error, HostKeyRejected)
            assert "known_hosts" in tunnel.last_error.fix
            assert all(settings.backoff_max / 2 <= d <= settings.backoff_max for d in delays)
            assert tunnel.attempts == 3
            assert not vps.server.connections  # nobody got in
        status = (tmp_path / "status.json").read_text()
        assert '"last_error_kind": "permanent"' in status


async def test_forward_refused_on_first_connect_is_a_configuration_error(tmp_path: Path):
    bind = free_port()
    authorize_agent(tmp_path)
    parked = asyncio.Event()
    delays: list[float] = []

    async def sleep(delay: float) -> None:
        delays.append(delay)
        parked.set()
        await asyncio.Event().wait()

    async with embedded_server(tmp_path, bind) as vps:
        wrong = f"127.0.0.1:{free_port()}"  # not the edge's upstream address
        settings = agent_settings(
            tmp_path, vps.port, wrong, "http://127.0.0.1:9", pinned=vps.server.host_public_key
        )
        async with running_tunnel(settings, sleep=sleep) as tunnel:
            async with asyncio.timeout(5):
                await parked.wait()
            assert isinstance(tunnel.last_error, ForwardMisconfigured)
            assert "BACKHAUL_EDGE_UPSTREAM" in tunnel.last_error.fix
            assert delays[0] >= settings.backoff_max / 2


async def test_reconnect_now_cuts_the_wait_short(tmp_path: Path):
    bind = free_port()
    authorize_agent(tmp_path)
    async with running_simulator() as sim, embedded_server(tmp_path, bind) as vps:
        settings = agent_settings(
            tmp_path,
            vps.port,
            f"127.0.0.1:{bind}",
            sim.url,
            pinned=public_line(make_key(tmp_path / "other")),
            backoff_max=60.0,
        )
        waiting = asyncio.Event()

        async def sleep(delay: float) -> None:
            waiting.set()
            await asyncio.sleep(delay)  # a real wait at the cap, which SIGHUP must cut short

        async with running_tunnel(settings, sleep=sleep) as tunnel:
            async with asyncio.timeout(5):
                await waiting.wait()  # the first attempt failed on the host key
            assert isinstance(tunnel.last_error, HostKeyRejected)
            # The operator fixes known_hosts and sends SIGHUP: no 30-60 s wait.
            pin(tmp_path / "known_hosts", vps.port, vps.server.host_public_key)
            tunnel.reconnect_now()
            async with asyncio.timeout(2):
                await tunnel.wait_up()
            # SIGHUP while up: drop and dial again at once.
            tunnel.reconnect_now()
            async with asyncio.timeout(2):
                await tunnel.wait_down()
                await tunnel.wait_up()
            assert tunnel.connects == 2
            assert tunnel.last_down_reason == "reconnect requested (SIGHUP)"


async def test_two_agents_with_one_key_newest_wins(tmp_path: Path):
    bind = free_port()
    authorize_agent(tmp_path)
    async with running_simulator() as sim, embedded_server(tmp_path, bind) as vps:
        settings = agent_settings(
            tmp_path,
            vps.port,
            f"127.0.0.1:{bind}",
            sim.url,
            pinned=vps.server.host_public_key,
            backoff_max=60.0,
        )
        # Entered in order: the second agent starts once the first one's forward is up.
        async with (
            running_tunnel(settings, up_within=5) as first,
            running_tunnel(settings) as second,
        ):
            async with asyncio.timeout(5):
                await second.wait_up()
                await first.wait_down()
            # The old one is told why and backs off to the cap instead of fighting back.
            assert isinstance(first.last_error, Replaced)
            assert "own key" in first.last_error.fix
            assert len(vps.server.connections) == 1
            assert vps.server.holder is not None
            assert (await generate_via(bind)).status == 200
            assert not first.is_up
