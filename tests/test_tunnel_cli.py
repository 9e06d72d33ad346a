"""`backhaul-agent run`, `status` and `keygen` as an operator (and systemd) runs them."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import aiohttp
import orjson

from agent.errors import HostKeyRejected
from agent.status import STATUS_FILE, StatusBoard
from simulator.serve import running_simulator
from tests.support.refusals import assert_agent_unavailable_at_once
from tests.support.servers import free_port
from tests.support.sshd import authorize_agent, edge_with_sshd, pin

AGENT = str(Path(sys.executable).parent / "backhaul-agent")


def test_keygen_writes_a_private_key_once_and_prints_the_lines(tmp_path: Path):
    key = tmp_path / "keys" / "agent_ed25519_key"
    args = [AGENT, "keygen", "--key-path", str(key), "--remote-bind", "127.0.0.1:11500"]
    out = subprocess.run(args, capture_output=True, text=True, check=True).stdout
    assert key.stat().st_mode & 0o777 == 0o600
    public = Path(f"{key}.pub").read_text().strip()
    assert public.startswith("ssh-ed25519 ")
    expected = (
        'restrict,port-forwarding,permitlisten="127.0.0.1:11500",command="/bin/false" ' + public
    )
    assert expected in out.splitlines()
    assert out.splitlines().count(public) == 2  # the public key, and the agent-keys line
    again = subprocess.run(args, capture_output=True, text=True, check=True)
    assert Path(f"{key}.pub").read_text().strip() == public  # not replaced
    assert "exists" in again.stderr
    subprocess.run([*args, "--force"], capture_output=True, text=True, check=True)
    assert Path(f"{key}.pub").read_text().strip() != public


def test_status_exit_codes_follow_the_state(tmp_path: Path):
    def status() -> subprocess.CompletedProcess[str]:
        args = [AGENT, "status", "--state-dir", str(tmp_path)]
        return subprocess.run(args, capture_output=True, text=True, check=False)

    assert status().returncode == 3  # no agent wrote anything here
    board = StatusBoard(tmp_path / STATUS_FILE, vps="vps:22", remote_bind="127.0.0.1:11434")
    board.model_server_up("ollama", "0.12.3")
    board.tunnel_up(connects=3)
    result = status()
    assert result.returncode == 0
    assert "tunnel       UP to vps:22" in result.stdout
    assert "reconnects   2" in result.stdout
    board.tunnel_down("Connection lost")
    board.tunnel_failed(HostKeyRejected("Host key is not trusted", "update known_hosts"))
    result = status()
    assert result.returncode == 1
    assert "fix          update known_hosts" in result.stdout
    board.status.pid = 2**22 + 1  # beyond pid_max's default: not running
    board.publish()
    assert status().returncode == 3


def test_run_refuses_to_start_without_a_key(tmp_path: Path):
    args = [AGENT, "run", "--key-path", str(tmp_path / "missing"), "--state-dir", str(tmp_path)]
    result = subprocess.run(args, capture_output=True, text=True, check=False)
    assert result.returncode == 2
    assert "backhaul-agent keygen" in result.stderr


class NotifySocket:
    """A stand-in for systemd's notify socket: collects the datagrams the agent sends."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(str(path))
        self.sock.setblocking(False)
        self.messages: list[str] = []

    async def wait_for(self, field: str) -> None:
        loop = asyncio.get_running_loop()
        while not any(field in m.split("\n") for m in self.messages):
            self.messages.append((await loop.sock_recv(self.sock, 4096)).decode())

    def close(self) -> None:
        self.sock.close()


async def test_run_under_systemd_ready_reload_sigterm_and_sigkill(tmp_path: Path):
    bind = free_port()
    authorize_agent(tmp_path)
    notify = NotifySocket(tmp_path / "notify.sock")
    async with (
        running_simulator() as sim,
        edge_with_sshd(bind, tmp_path) as e,
        aiohttp.ClientSession() as http,
    ):
        server = e.sshd
        pin(tmp_path / "known_hosts", server.port, server.host_public_key)
        env = {
            **os.environ,
            "NOTIFY_SOCKET": str(notify.path),
            "WATCHDOG_USEC": "200000",
            "BACKHAUL_AGENT_SSH_PORT": str(server.port),
            "BACKHAUL_AGENT_SSH_USER": "agent",
            "BACKHAUL_AGENT_KEY_PATH": str(tmp_path / "agent_key"),
            "BACKHAUL_AGENT_KNOWN_HOSTS": str(tmp_path / "known_hosts"),
            "BACKHAUL_AGENT_REMOTE_BIND": f"127.0.0.1:{bind}",
            "BACKHAUL_AGENT_UPSTREAM": sim.url,
            "BACKHAUL_AGENT_STATE_DIR": str(tmp_path),
            "BACKHAUL_AGENT_LOG_FORMAT": "json",
        }
        with (tmp_path / "agent.log").open("wb") as log:
            proc = await asyncio.create_subprocess_exec(AGENT, "run", env=env, stderr=log)
            try:
                async with asyncio.timeout(15):
                    await notify.wait_for("READY=1")
                    await server.wait_present(True)
                    await notify.wait_for("WATCHDOG=1")
                assert any(m.startswith("STATUS=tunnel forwarding") for m in notify.messages)
                status = orjson.loads((tmp_path / STATUS_FILE).read_bytes())
                assert status["connected"] is True
                assert status["pid"] == proc.pid

                # SIGHUP (systemctl reload): a new connection, at once.
                holder = server.holder
                assert holder is not None
                proc.send_signal(signal.SIGHUP)
                async with asyncio.timeout(5):
                    await holder.closed.wait()
                    await server.wait_present(True)
                assert server.holder is not holder

                # SIGTERM: connection closed, exit 0, within a second.
                start = time.monotonic()
                proc.send_signal(signal.SIGTERM)
                async with asyncio.timeout(1.0):
                    assert await proc.wait() == 0
                    await server.wait_present(False)
                assert time.monotonic() - start < 1.0
                await notify.wait_for("STOPPING=1")
                status = orjson.loads((tmp_path / STATUS_FILE).read_bytes())
                assert status["connected"] is False
                assert status["reconnects"] == 1

                # SIGKILL: no goodbye at all. The kernel closes the socket, the edge's SSH
                # server sees it, and the next request is a 503 at once.
                proc = await asyncio.create_subprocess_exec(AGENT, "run", env=env, stderr=log)
                async with asyncio.timeout(15):
                    await server.wait_present(True)
                proc.kill()
                async with asyncio.timeout(1.0):
                    await server.wait_present(False)
                await assert_agent_unavailable_at_once(http, e, "after-sigkill")
            finally:
                if proc.returncode is None:
                    proc.kill()
                await proc.wait()
                notify.close()
    lines = (tmp_path / "agent.log").read_bytes().splitlines()
    events = {orjson.loads(line)["event"] for line in lines if line.startswith(b"{")}
    expected = {"agent.starting", "tunnel.up", "agent.ready", "tunnel.reconnect_requested"}
    assert expected | {"tunnel.down", "agent.stopping", "agent.stopped"} <= events
