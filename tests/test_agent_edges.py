"""One agent, several edges (`extra_edges`): a forward to each, and losing one loses nothing else.

The agent runs as deployed (`backhaul-agent run` in its own process, `agent_process`) against
two embedded SSH servers, each granting its own bind port and both accepting the one agent key;
its systemd notify datagrams (READY=1, STATUS=) are what the tests wait on, every wait bounded.
"""

from __future__ import annotations

import asyncio
import json
import socket
import subprocess
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path

import aiohttp
import orjson
import pytest

from agent.settings import AgentSettings
from agent.status import STATUS_FILE, read_status
from shared.errors import ConfigError
from simulator.serve import running_simulator
from tests.support.metrics import scrape
from tests.support.servers import free_port
from tests.support.sshd import (
    AGENT,
    agent_process,
    authorize_agent,
    embedded_server,
    generate_via,
    make_key,
    pin,
    public_line,
)

FAST = {"backoff_initial": "0.05", "backoff_max": "0.5", "stable_after": "0"}
SLACK_S = 10.0  # a cold agent process on this busy 2-core machine


class NotifySocket:
    """systemd's side of sd_notify: every datagram the agent sends, in order."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(str(path))
        self.sock.setblocking(False)
        self.messages: list[str] = []
        self._mark = 0

    def mark(self) -> None:
        """From now on, `wait_for` looks only at messages not yet received."""
        self._mark = len(self.messages)

    async def wait_for(self, wanted: Callable[[str], bool]) -> str:
        """The first message since the mark for which `wanted` is true, waiting for it if none
        came yet (READY=1 and the STATUS of a second edge race, so order is not assumed)."""
        loop = asyncio.get_running_loop()
        seen = self._mark
        while True:
            for message in self.messages[seen:]:
                if wanted(message):
                    return message
            seen = len(self.messages)
            self.messages.append((await loop.sock_recv(self.sock, 65536)).decode())


@asynccontextmanager
async def notify_socket(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> AsyncIterator[NotifySocket]:
    notify = NotifySocket(tmp_path / "notify.sock")
    monkeypatch.setenv("NOTIFY_SOCKET", str(notify.path))  # read by the agent process only
    try:
        yield notify
    finally:
        notify.sock.close()


def extra_edge(port: int, known_hosts: Path, bind: int) -> str:
    """BACKHAUL_AGENT_EXTRA_EDGES for one more edge on 127.0.0.1:`port`, as JSON."""
    target = {
        "host": "127.0.0.1",
        "port": port,
        "known_hosts": str(known_hosts),
        "remote_bind": f"127.0.0.1:{bind}",
    }
    return json.dumps([target])


def status_command(state_dir: Path) -> subprocess.CompletedProcess[str]:
    args = [AGENT, "status", "--state-dir", str(state_dir)]
    return subprocess.run(args, capture_output=True, text=True, check=False)


def log_events(path: Path) -> list[dict[str, object]]:
    lines = path.read_bytes().splitlines()
    return [orjson.loads(line) for line in lines if line.startswith(b"{")]


async def test_each_edge_has_its_forward_and_losing_one_loses_nothing_else(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    bind_a, bind_b = free_port(), free_port()
    authorize_agent(tmp_path)
    b_host_key = tmp_path / "b_host_key"
    async with (
        running_simulator() as sim,
        notify_socket(tmp_path, monkeypatch) as notify,
        embedded_server(tmp_path, bind_a) as a,
        embedded_server(tmp_path, bind_b, ssh_host_key=b_host_key) as b,
    ):
        a_edge, b_port, b_edge = f"127.0.0.1:{a.port}", b.port, f"127.0.0.1:{b.port}"
        b_known = pin(tmp_path / "b_known_hosts", b_port, b.server.host_public_key)
        extra = extra_edge(b_port, b_known, bind_b)
        async with agent_process(tmp_path, a.server, bind_a, sim.url, extra_edges=extra, **FAST):
            async with asyncio.timeout(SLACK_S):
                await b.wait_present(True)
                await notify.wait_for(lambda m: "READY=1" in m.split("\n"))
                await notify.wait_for(lambda m: "2/2 edges up" in m)
            for bind in (bind_a, bind_b):
                assert (await generate_via(bind)).status == 200

            # Edge B crashes: A's forward carries on, on the same connection.
            notify.mark()
            b.abort_all()
            await b.server.close()
            async with asyncio.timeout(SLACK_S):
                await notify.wait_for(lambda m: f"{b_edge} down (transient" in m)
            for _ in range(3):
                assert (await generate_via(bind_a)).status == 200
            assert a.presence == [True]
            status = read_status(tmp_path / STATUS_FILE)
            assert status is not None
            assert status.connected  # the top-level fields are the first edge's
            assert status.edges_up == 1
            first, second = status.edges
            assert (first.edge, first.connected) == (a_edge, True)
            assert (second.edge, second.connected) == (b_edge, False)
            assert second.last_disconnect_reason
            assert second.last_error_kind == "transient"
            shown = status_command(tmp_path)
            assert shown.returncode == 1  # an edge down is a degraded agent
            assert f"{b_edge}  DOWN" in shown.stdout

            # B comes back on the same port with the same host key: the agent returns to it.
            notify.mark()
            async with embedded_server(
                tmp_path, bind_b, port=b_port, ssh_host_key=b_host_key
            ) as again:
                async with asyncio.timeout(SLACK_S):
                    await again.wait_present(True)
                    await notify.wait_for(lambda m: "2/2 edges up" in m)
                assert (await generate_via(bind_b)).status == 200
                status = read_status(tmp_path / STATUS_FILE)
                assert status is not None
                assert [(e.connected, e.reconnects) for e in status.edges] == [(True, 0), (True, 1)]
                assert a.presence == [True]
    ups = [str(e["edge"]) for e in log_events(tmp_path / "agent.log") if e["event"] == "tunnel.up"]
    assert sorted(ups) == sorted([a_edge, b_edge, b_edge])


async def test_an_edge_that_never_comes_up_is_its_own_problem(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    bind_a, bind_b = free_port(), free_port()
    authorize_agent(tmp_path)
    metrics_port = free_port()
    impostor = public_line(make_key(tmp_path / "impostor"))
    async with (
        running_simulator() as sim,
        notify_socket(tmp_path, monkeypatch) as notify,
        embedded_server(tmp_path, bind_a) as a,
        embedded_server(tmp_path, bind_b, ssh_host_key=tmp_path / "b_host_key") as b,
    ):
        a_edge, b_edge = f"127.0.0.1:{a.port}", f"127.0.0.1:{b.port}"
        b_known = pin(tmp_path / "b_known_hosts", b.port, impostor)  # not B's key
        extra = extra_edge(b.port, b_known, bind_b)
        async with agent_process(
            tmp_path, a.server, bind_a, sim.url, extra_edges=extra, metrics_port=str(metrics_port)
        ):
            async with asyncio.timeout(SLACK_S):
                await notify.wait_for(lambda m: "READY=1" in m.split("\n"))
                await notify.wait_for(lambda m: f"{b_edge} down (permanent" in m)
            assert (await generate_via(bind_a)).status == 200
            assert not b.server.connections  # nobody got into B
            status = read_status(tmp_path / STATUS_FILE)
            assert status is not None
            assert status.connected and status.last_error is None  # the first edge: fine
            broken = status.edges[1]
            assert (broken.edge, broken.last_error_kind) == (b_edge, "permanent")
            assert broken.fix is not None
            assert b_edge in broken.fix and str(b_known) in broken.fix
            shown = status_command(tmp_path)
            assert shown.returncode == 1
            assert f"fix   the host key of {b_edge}" in shown.stdout
            async with aiohttp.ClientSession() as http:
                m = await scrape(http, f"http://127.0.0.1:{metrics_port}")
            assert m[("backhaul_agent_connected", frozenset())] == 1
            assert m[("backhaul_agent_edge_connected", frozenset({("edge", a_edge)}))] == 1
            assert m[("backhaul_agent_edge_connected", frozenset({("edge", b_edge)}))] == 0
            errors = [labels for name, labels in m if name == "backhaul_agent_edge_error_info"]
            assert [dict(labels)["edge"] for labels in errors] == [b_edge]
            assert dict(errors[0])["kind"] == "permanent"


def test_extra_edges_from_toml_inherit_what_they_leave_out(tmp_path: Path):
    config = tmp_path / "agent.toml"
    config.write_text(
        """\
ssh_host = "vps1.example.net"
ssh_user = "backhaul"
known_hosts = "pins"
remote_bind = "127.0.0.1:11434"

[[extra_edges]]
host = "vps2.example.net"

[[extra_edges]]
host = "vps3.example.net"
port = 22
user = "tunnel"
known_hosts = "vps3_pins"
remote_bind = "127.0.0.1:11500"
"""
    )
    first, second, third = AgentSettings.load(config).per_edge()
    assert (first.ssh_host, first.ssh_port, first.extra_edges) == ("vps1.example.net", 2222, [])
    assert (second.ssh_host, second.ssh_port, second.ssh_user) == (
        "vps2.example.net",
        2222,
        "backhaul",
    )
    assert (second.known_hosts, second.remote_bind) == (Path("pins"), "127.0.0.1:11434")
    assert (third.ssh_port, third.ssh_user, third.known_hosts) == (22, "tunnel", Path("vps3_pins"))
    assert third.remote_bind == "127.0.0.1:11500"

    config.write_text('ssh_host = "vps1"\n[[extra_edges]]\nhost = "vps1"\n')
    with pytest.raises(ConfigError, match="vps1:2222 is listed twice"):
        AgentSettings.load(config)
    config.write_text('[[extra_edges]]\nhost = "vps2"\nhostname = "typo"\n')
    with pytest.raises(ConfigError, match="hostname"):
        AgentSettings.load(config)
