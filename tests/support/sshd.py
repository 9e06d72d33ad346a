"""The VPS side for the tunnel tests: real SSH servers and a half-open relay on 127.0.0.1.

- `embedded_server()`: the edge's own asyncssh server (`edge.upstreams.sshd`), in-process: the
  fast tier.
- `OpenSSHServer`: a real, unprivileged `/usr/sbin/sshd -D -e -f cfg` on a high loopback port with
  its own host key, pid file and authorized_keys, and the `Match User` block docs/deploy.md
  ships. It logs in only the user running the tests (root here and in CI, via
  `PermitRootLogin prohibit-password`, the default).
- `HalfOpenRelay`: a TCP relay whose `blackhole()` keeps every socket open and drops the bytes,
  like a NAT that forgot the flow (frp's `halfopen.go`).
- `running_tunnel()`: the agent's `Tunnel` in a task group for the length of a block.
- `edge_with_sshd()`: the real edge with its embedded SSH server on; `generate_via()`: one
  request to the forward's VPS end.
- `agent_process()`: `backhaul-agent run` in its own process, as systemd runs it, for races a
  single event loop cannot show.
"""

from __future__ import annotations

import asyncio
import getpass
import os
import signal
import subprocess
import sys
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager, suppress
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import asyncssh
import pytest

from agent.keygen import authorized_keys_line, generate
from agent.settings import AgentSettings
from agent.tunnel import Tunnel
from edge.settings import EdgeSettings
from edge.upstreams.sshd import EmbeddedSSHServer
from tests.support.servers import Edge, edge, free_port

SSHD = Path("/usr/sbin/sshd")
AGENT = str(Path(sys.executable).parent / "backhaul-agent")
GEN = {"model": "llama3.2:1b", "prompt": "hi", "stream": False}


def requires_sshd() -> pytest.MarkDecorator:
    """Mark for the real-OpenSSH tier: it must run in CI (`CI` set), so it skips only locally."""
    reason = f"{SSHD} is not installed (apt-get install openssh-server; .ci/run does)"
    missing = not SSHD.exists() and not os.environ.get("CI")
    return pytest.mark.skipif(missing, reason=reason)


def make_key(path: Path, comment: str = "test") -> asyncssh.SSHKey:
    """An ed25519 key pair at `path` (0600) and `path.pub`, as `backhaul-agent keygen` makes it."""
    return generate(path, comment)


def public_line(key: asyncssh.SSHKey) -> str:
    return key.export_public_key("openssh").decode().strip()


def authorize_agent(tmp_path: Path) -> asyncssh.SSHKey:
    """Make the agent's key (`tmp_path/agent_key`) and list it in the edge's `agent_keys`."""
    key = make_key(tmp_path / "agent_key")
    (tmp_path / "agent_keys").write_text(public_line(key))
    return key


def pin(path: Path, port: int, host_public_key: str) -> Path:
    """Write a known_hosts file pinning `host_public_key` for 127.0.0.1:`port`."""
    path.write_text(f"[127.0.0.1]:{port} {host_public_key}\n")
    return path


def agent_settings(
    tmp_path: Path,
    ssh_port: int,
    remote_bind: str,
    upstream: str,
    *,
    pinned: str | None = None,
    **overrides: Any,
) -> AgentSettings:
    """Agent settings for a test: fast backoff and keepalives, files in `tmp_path`.

    `pinned`: a host public key to write to `known_hosts` for 127.0.0.1:`ssh_port`.
    """
    if pinned is not None:
        pin(tmp_path / "known_hosts", ssh_port, pinned)
    values: dict[str, Any] = {
        "ssh_host": "127.0.0.1",
        "ssh_port": ssh_port,
        "ssh_user": getpass.getuser(),
        "key_path": tmp_path / "agent_key",
        "known_hosts": tmp_path / "known_hosts",
        "remote_bind": remote_bind,
        "upstream": upstream,
        "state_dir": tmp_path,
        "backoff_initial": 0.05,
        "backoff_max": 0.5,
        "stable_after": 0.0,
        "keepalive_interval": 1.0,
        "keepalive_count_max": 2,
        "connect_timeout": 2.0,
        "login_timeout": 5.0,
    }
    values.update(overrides)
    return AgentSettings(**values)


@dataclass
class EmbeddedVPS:
    """An embedded server plus what the tests need to talk to it."""

    server: EmbeddedSSHServer
    settings: EdgeSettings
    presence: list[bool] = field(default_factory=list)  # each forward bound, each one ended
    urls: dict[str, str] = field(default_factory=dict)  # each agent's forward, by name

    @property
    def port(self) -> int:
        return self.server.port

    def attached(self, name: str, url: str) -> None:
        self.presence.append(True)
        self.urls[name] = url

    def detached(self, name: str) -> None:
        self.presence.append(False)

    async def wait_present(self, present: bool, name: str | None = None) -> None:
        await self.server.wait_present(present, name)

    def abort_all(self) -> None:
        """What a crash looks like to the agent: every connection dropped at once."""
        for agent in list(self.server.connections):
            agent.conn.abort()


@asynccontextmanager
async def embedded_server(
    tmp_path: Path, bind_port: int, *, port: int = 0, **settings: Any
) -> AsyncIterator[EmbeddedVPS]:
    """The edge's SSH server on 127.0.0.1 (`port` 0: any), granting 127.0.0.1:`bind_port`."""
    values: dict[str, Any] = {
        "ssh_port": 2222,  # "on"; the real port is `port`
        "ssh_host_key": tmp_path / "ssh_host_ed25519_key",
        "agent_keys": tmp_path / "agent_keys",
        "upstream": f"http://127.0.0.1:{bind_port}",
        "telemetry_path": None,
    }
    values.update(settings)
    config = EdgeSettings(**values)
    vps = EmbeddedVPS(server=None, settings=config)  # type: ignore[arg-type]
    vps.server = EmbeddedSSHServer(config, vps.attached, vps.detached, port=port)
    await vps.server.start()
    try:
        yield vps
    finally:
        await vps.server.close()


@asynccontextmanager
async def running_tunnel(
    settings: AgentSettings, *, up_within: float | None = None, **kwargs: Any
) -> AsyncIterator[Tunnel]:
    """Run `Tunnel(settings).run_tunnel()` for the block; cancelled (SIGTERM path) at the end.

    With `up_within`, the block starts once the forward is up, and fails after that many seconds.
    """
    tunnel = Tunnel(settings, **kwargs)
    async with asyncio.TaskGroup() as tg:
        task = tg.create_task(tunnel.run_tunnel())
        try:
            if up_within is not None:
                async with asyncio.timeout(up_within):
                    await tunnel.wait_up()
            yield tunnel
        finally:
            task.cancel()


@asynccontextmanager
async def edge_with_sshd(bind: int, tmp_path: Path, **settings: Any) -> AsyncIterator[Edge]:
    """The real edge proxying to 127.0.0.1:`bind`, its SSH server on (host key, agent_keys in
    `tmp_path`); the server is `e.sshd`."""
    async with edge(
        f"http://127.0.0.1:{bind}",
        tmp_path,
        ssh_port=free_port(),
        ssh_host_key=tmp_path / "ssh_host_ed25519_key",
        agent_keys=tmp_path / "agent_keys",
        **settings,
    ) as e:
        yield e


@asynccontextmanager
async def agent_process(
    tmp_path: Path, server: EmbeddedSSHServer, bind: int, upstream: str, **settings: str
) -> AsyncIterator[asyncio.subprocess.Process]:
    """`backhaul-agent run` in its own process, connected to the embedded `server` with the key
    `authorize_agent()` made, forwarding 127.0.0.1:`bind` to `upstream`; present for the block,
    stopped with SIGTERM after it. Its log is `tmp_path/agent.log`; `settings` are further
    BACKHAUL_AGENT_* variables, named without the prefix (`probe_interval="60"`)."""
    pin(tmp_path / "known_hosts", server.port, server.host_public_key)
    env = {
        **os.environ,
        "BACKHAUL_AGENT_SSH_PORT": str(server.port),
        "BACKHAUL_AGENT_SSH_USER": "agent",
        "BACKHAUL_AGENT_KEY_PATH": str(tmp_path / "agent_key"),
        "BACKHAUL_AGENT_KNOWN_HOSTS": str(tmp_path / "known_hosts"),
        "BACKHAUL_AGENT_REMOTE_BIND": f"127.0.0.1:{bind}",
        "BACKHAUL_AGENT_UPSTREAM": upstream,
        "BACKHAUL_AGENT_STATE_DIR": str(tmp_path),
        "BACKHAUL_AGENT_LOG_FORMAT": "json",
        **{f"BACKHAUL_AGENT_{name.upper()}": value for name, value in settings.items()},
    }
    with (tmp_path / "agent.log").open("wb") as log:
        proc = await asyncio.create_subprocess_exec(AGENT, "run", env=env, stderr=log)
        try:
            async with asyncio.timeout(15):  # a cold interpreter on a busy 2-core machine
                await server.wait_present(True)
            yield proc
        finally:
            with suppress(ProcessLookupError):
                proc.terminate()
            try:
                async with asyncio.timeout(10):
                    await proc.wait()
            except TimeoutError:
                proc.kill()
                await proc.wait()
                raise


@asynccontextmanager
async def ssh_connect(
    port: int, host_public_key: str, key: asyncssh.SSHKey, username: str
) -> AsyncIterator[asyncssh.SSHClientConnection]:
    """A plain asyncssh client on 127.0.0.1:`port`, pinned, offering only `key`."""
    async with asyncssh.connect(
        "127.0.0.1",
        port,
        username=username,
        client_keys=[key],
        known_hosts=([asyncssh.import_public_key(host_public_key)], [], []),
        config=[],
        agent_path=None,
    ) as conn:
        yield conn


async def generate_via(port: int) -> aiohttp.ClientResponse:
    """POST `GEN` to 127.0.0.1:`port` (the forward's VPS end): the response, its body read."""
    async with (
        aiohttp.ClientSession() as http,
        http.post(f"http://127.0.0.1:{port}/api/generate", json=GEN) as r,
    ):
        await r.read()
    return r


class HalfOpenRelay:
    """127.0.0.1:port -> target; `blackhole()` silences live connections without closing them."""

    def __init__(self, target_port: int) -> None:
        self.target_port = target_port
        self._server: asyncio.Server | None = None
        self._writers: list[asyncio.StreamWriter] = []
        self._generation = 0  # connections of an older generation are blackholed
        self.port = 0

    async def __aenter__(self) -> HalfOpenRelay:
        self._server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._server is not None
        self._server.close()
        for writer in self._writers:
            writer.transport.abort()
        await self._server.wait_closed()

    def blackhole(self) -> None:
        """Existing connections: bytes read and dropped, sockets kept open. New ones relay."""
        self._generation += 1

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._writers.append(writer)
        generation = self._generation
        try:
            up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.target_port)
        except OSError:
            writer.transport.abort()
            return
        self._writers.append(up_writer)

        def alive() -> bool:
            return self._generation == generation

        async with asyncio.TaskGroup() as tg:
            tg.create_task(self._pipe(reader, up_writer, alive))
            tg.create_task(self._pipe(up_reader, writer, alive))

    @staticmethod
    async def _pipe(
        reader: asyncio.StreamReader, writer: asyncio.StreamWriter, alive: Callable[[], bool]
    ) -> None:
        with suppress(ConnectionError, OSError):
            while data := await reader.read(65536):
                if alive():
                    writer.write(data)
                    await writer.drain()
        if alive():
            writer.transport.abort()


def _descendants(pid: int) -> list[int]:
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        children.setdefault(ppid, []).append(int(entry.name))
    found: list[int] = []
    todo = [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


class OpenSSHServer:
    """An unprivileged-style OpenSSH sshd on 127.0.0.1 for the current user, per docs/deploy.md."""

    def __init__(
        self,
        directory: Path,
        bind_port: int,
        agent_key: asyncssh.SSHKey,
        *,
        client_alive_interval: int = 1,
        client_alive_count_max: int = 1,
        port: int | None = None,
    ) -> None:
        self.dir = directory
        self.dir.mkdir(parents=True, exist_ok=True)
        self.bind_port = bind_port
        self.port = port or free_port()
        self.user = getpass.getuser()
        self.host_key_path = self.dir / "ssh_host_ed25519_key"
        if not self.host_key_path.exists():
            make_key(self.host_key_path, "sshd-test")
        self.host_public_key = Path(f"{self.host_key_path}.pub").read_text().strip()
        # The very line `backhaul-agent keygen` prints for system-sshd mode.
        line = authorized_keys_line(public_line(agent_key), f"127.0.0.1:{bind_port}")
        (self.dir / "authorized_keys").write_text(f"{line}\n")
        self.config = self.dir / "sshd_config"
        self.config.write_text(
            f"""\
Port {self.port}
ListenAddress 127.0.0.1
HostKey {self.host_key_path}
PidFile {self.dir}/sshd.pid
AuthorizedKeysFile {self.dir}/authorized_keys
StrictModes no
UsePAM yes
PubkeyAuthentication yes
PasswordAuthentication no
KbdInteractiveAuthentication no
PermitRootLogin prohibit-password
AllowTcpForwarding no
AllowAgentForwarding no
PermitTTY no
X11Forwarding no
LogLevel VERBOSE
Match User {self.user}
    AllowTcpForwarding remote
    PermitListen 127.0.0.1:{bind_port}
    GatewayPorts no
    PermitTTY no
    X11Forwarding no
    ClientAliveInterval {client_alive_interval}
    ClientAliveCountMax {client_alive_count_max}
"""
        )
        if os.geteuid() == 0:
            # sshd run as root insists on its privilege-separation directory (Debian's unit
            # makes it at boot; a container or a fresh CI machine may not have it yet).
            Path("/run/sshd").mkdir(mode=0o755, exist_ok=True)
        check = subprocess.run(
            [str(SSHD), "-t", "-f", str(self.config)], capture_output=True, text=True, check=False
        )
        assert check.returncode == 0, check.stderr
        self.proc: asyncio.subprocess.Process | None = None
        self.log: list[str] = []
        self._reader: asyncio.Task[None] | None = None

    async def start(self) -> None:
        """Start sshd and return once it says it listens (its own log line, not a poll)."""
        self.proc = await asyncio.create_subprocess_exec(
            str(SSHD), "-D", "-e", "-f", str(self.config), stderr=asyncio.subprocess.PIPE
        )
        listening = asyncio.Event()
        self._reader = asyncio.get_running_loop().create_task(self._read_log(listening))
        async with asyncio.timeout(10):
            await listening.wait()

    async def _read_log(self, listening: asyncio.Event) -> None:
        assert self.proc is not None
        assert self.proc.stderr is not None
        while line := await self.proc.stderr.readline():
            text = line.decode(errors="replace").rstrip()
            self.log.append(text)
            if "Server listening on" in text:
                listening.set()

    def session_pids(self) -> list[int]:
        """The per-connection sshd processes now (children of the listener)."""
        assert self.proc is not None
        return _descendants(self.proc.pid)

    @staticmethod
    async def wait_exited(pids: list[int]) -> None:
        """Return once every process in `pids` has exited (pidfd: an event, not a poll)."""
        loop = asyncio.get_running_loop()
        for pid in pids:
            try:
                fd = os.pidfd_open(pid)
            except ProcessLookupError:
                continue
            exited = asyncio.Event()
            loop.add_reader(fd, exited.set)
            try:
                await exited.wait()
            finally:
                loop.remove_reader(fd)
                os.close(fd)

    def kill_sessions(self) -> None:
        """SIGKILL the per-connection sshd processes (a session crash), keep the listener."""
        assert self.proc is not None
        for pid in _descendants(self.proc.pid):
            with suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)

    async def stop(self) -> None:
        """Kill the listener and every session: what a VPS reboot looks like."""
        if self.proc is None:
            return
        sessions = _descendants(self.proc.pid)
        with suppress(ProcessLookupError):
            self.proc.kill()
        for pid in sessions:
            with suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        await self.proc.wait()
        if self._reader is not None:
            with suppress(asyncio.CancelledError):
                self._reader.cancel()
                await self._reader
        self.proc = None

    async def __aenter__(self) -> OpenSSHServer:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()


def sshd_version() -> tuple[int, int]:
    """The installed OpenSSH's (major, minor), from `sshd -V` (e.g. OpenSSH_9.2p1)."""
    out = subprocess.run([str(SSHD), "-V"], capture_output=True, text=True, check=False).stderr
    version = out.split("OpenSSH_", 1)[1].split()[0] if "OpenSSH_" in out else "0.0"
    major, _, minor = version.partition(".")
    return int(major), int("".join(c for c in minor if c.isdigit())[:1] or 0)
