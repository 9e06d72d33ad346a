"""The tunnel: one reconnect loop (`run_tunnel`) around one SSH connection at a time.

Why it is shaped like this
--------------------------
One loop owns reconnection; `connect_once()` owns exactly one connection from dial to close
(chisel's connectionLoop/connectionOnce split). Everything that can end a connection ends in
the same place, so there is one answer to "what happens next": the loop decides a delay, logs
`tunnel.retry_scheduled`, waits, dials again. Nothing else ever reconnects.

`connect_once()` raises a `TunnelError` when the attempt fails before the forward is up, and
returns normally when an established connection ends, because that is how asyncssh reports the
end: a server-side close, a reset, a keepalive timeout all make `wait_closed()` return without
raising. The reason arrives separately, in `SSHClient.connection_lost(exc)`, which `_Client`
keeps for the `tunnel.down` event. A normal return therefore always means "down", never "done".

Failures are sorted once, by the tables in `agent.errors`: transient ones (refused, timeouts,
drops, a stale bind) back off with full jitter; permanent ones (host key, auth, a forward
refused on the very first connect, another agent with our key) are said loudly with their fix
and retried only at the cap, so a broken agent never hammers the VPS. A forward refused after an
earlier success is the old session's port still held by sshd until it reaps it: expected,
transient. The backoff restarts only after a connection stayed up `stable_after` seconds.

Dead paths are found by SSH keepalives (asyncssh's default is off; `agent.ssh` turns them on):
a silent path ends the connection within interval x (count_max + 1) seconds.

OpenSSH before 10.1 sets TCP_NODELAY on its end of the SSH connection only when a session runs
a command; with a bare forward (`ssh -N -R`) small forwarded messages stall about 40 ms on a
delayed ACK. Measured here against OpenSSH 9.2: one exec on a session fixes it for the life of
the connection even when the command (the key's forced `/bin/false`) exits at once, so after the
forward is up the agent runs one, when the server is OpenSSH (`open_session`).

One `Tunnel` holds one edge's forward: an agent with several edges (`extra_edges`) runs one each
(`agent.run`), every one with its own connection, backoff and status entry, and every event of
its own carries `edge=host:port`.

Shutdown (SIGTERM cancels `run_tunnel`): the connection is closed first, which closes its
listener with it; the listener is never awaited before the connection is closed (awaiting it
first can wait on open forwarded connections forever: tunstrap #50). SIGHUP calls
`reconnect_now()`: drop the connection if there is one and dial again without waiting.
"""

from __future__ import annotations

import asyncio
import random
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from typing import cast

import asyncssh
import structlog

from agent import ssh
from agent.backoff import Backoff
from agent.errors import (
    TRANSLATED,
    ConnectionDropped,
    ForwardMisconfigured,
    ForwardRefused,
    Replaced,
    TunnelError,
    classify,
    describe,
    operator_fixes,
)
from agent.settings import AgentSettings
from agent.status import StatusBoard

log = structlog.get_logger(__name__)

Sleep = Callable[[float], Awaitable[None]]

# Seconds to wait for a closed connection's goodbye before moving on (SIGTERM must exit in 1 s).
_CLOSE_TIMEOUT_S = 0.5
# Seconds allowed for the one-command session that turns on TCP_NODELAY in OpenSSH.
_NUDGE_TIMEOUT_S = 5.0


class _Client(asyncssh.SSHClient):
    """Keeps why the connection ended: `wait_closed()` does not say, `connection_lost` does."""

    def __init__(self) -> None:
        self.lost: Exception | None = None

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost = exc


class Tunnel:
    """The agent's reverse forward, kept up by `run_tunnel()`.

    `sleep` and `rng` are injectable so tests can observe the delays without waiting them out.
    """

    def __init__(
        self,
        settings: AgentSettings,
        board: StatusBoard | None = None,
        *,
        sleep: Sleep = asyncio.sleep,
        rng: Callable[[], float] = random.random,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._settings = settings
        self.edge = f"{settings.ssh_host}:{settings.ssh_port}"
        self._log = log.bind(edge=self.edge)
        self._board = board or StatusBoard(None)
        self._board.add_edge(self.edge, settings.remote_bind)
        self._sleep = sleep
        self._clock = clock
        self.backoff = Backoff(
            settings.backoff_initial, settings.backoff_max, settings.stable_after, rng
        )
        self._up = asyncio.Event()
        self._down = asyncio.Event()
        self._down.set()
        self._kick = asyncio.Event()
        self._conn: asyncssh.SSHClientConnection | None = None
        self._closed_by_us: str | None = None  # "we closed it" is not "it broke"
        self._forwarded_once = False
        self._up_since = 0.0
        self.attempts = 0  # connection attempts so far
        self.connects = 0  # attempts that got the forward up
        self.last_error: TunnelError | None = None
        self.failures: Counter[str] = Counter()  # failure class name -> count, for status/tests
        self.last_down_reason: str | None = None
        self.cipher: str | None = None  # negotiated on the last connection (agent.ssh.CIPHERS)
        self._fixes = operator_fixes(settings)

    @property
    def is_up(self) -> bool:
        return self._up.is_set()

    async def wait_up(self) -> None:
        """Return once the forward is up (at once if it is)."""
        await self._up.wait()

    async def wait_down(self) -> None:
        """Return once the forward is down (at once if it is)."""
        await self._down.wait()

    def reconnect_now(self) -> None:
        """SIGHUP: drop the current connection, if any, and dial again without a backoff wait."""
        self._log.info("tunnel.reconnect_requested", connected=self.is_up)
        self._kick.set()
        if self._conn is not None:
            self._closed_by_us = "reconnect requested (SIGHUP)"
            self._conn.close()

    async def run_tunnel(self) -> None:
        """Keep the forward up until cancelled; never returns otherwise."""
        while True:
            self.attempts += 1
            try:
                await self.connect_once()
            except TunnelError as err:
                delay = self._after_failure(err)
            else:
                self.backoff.session_ended(self._clock() - self._up_since)
                delay = self.backoff.next_delay()
            if self._kick.is_set():
                delay = 0.0
            self._board.retry_in(delay, self.edge)
            self._log.info(
                "tunnel.retry_scheduled", delay_s=round(delay, 3), attempt=self.attempts + 1
            )
            await self._pause(delay)

    async def connect_once(self) -> None:
        """Own one connection: dial, forward, wait for the end.

        Resource handling: the connection is closed on every way out, cancellation included,
        and its close is awaited at most `_CLOSE_TIMEOUT_S`.
        Error handling: raises a `TunnelError` if the forward never came up, or if the
        connection ended for a reason the loop must treat specially (`Replaced`); returns
        normally when an established connection ended (that is "down", not "done").
        """
        s = self._settings
        try:
            options = ssh.client_options(s)
            self._log.debug("tunnel.connecting")
            conn, owner = await asyncssh.create_connection(
                _Client, s.ssh_host, s.ssh_port, options=options
            )
        except TRANSLATED as exc:  # anything else is a bug and reaches the task group
            raise classify(exc, self._fixes) from exc
        client = cast(_Client, owner)
        self._conn = conn
        up = False
        try:
            await self._forward(conn, client)
            await self._nudge_nodelay(conn)
            self._mark_up(conn)
            up = True
            await conn.wait_closed()
            up = False
            self._mark_down(self._closed_by_us or describe(client.lost))
            if isinstance(client.lost, asyncssh.DisconnectError):
                ended = classify(client.lost, self._fixes)
                if isinstance(ended, Replaced):  # the only end the loop treats specially
                    raise ended from client.lost
        finally:
            self._conn, self._closed_by_us = None, None
            conn.close()
            try:
                async with asyncio.timeout(_CLOSE_TIMEOUT_S):
                    await conn.wait_closed()
            except TimeoutError:
                self._log.debug("tunnel.close_timeout")
            if up:  # cancelled while up: SIGTERM
                self._mark_down("agent stopping")

    async def _forward(self, conn: asyncssh.SSHClientConnection, client: _Client) -> None:
        s = self._settings
        host, port = s.remote_address
        dest_host, dest_port = s.model_server_address
        try:
            await conn.forward_remote_port(host, port, dest_host, dest_port)
        except asyncssh.ChannelListenError as exc:
            if client.lost is not None or conn.is_closed():
                raise ConnectionDropped(describe(client.lost)) from exc
            if self._forwarded_once:
                raise ForwardRefused(
                    f"the VPS refused to listen on {s.remote_bind}: the previous session "
                    "still holds it (expected until sshd reaps it)"
                ) from exc
            raise ForwardMisconfigured(
                f"the VPS refused to listen on {s.remote_bind} on the first connect",
                self._fixes[ForwardMisconfigured],
            ) from exc
        except TRANSLATED as exc:
            raise classify(exc, self._fixes) from exc

    async def _nudge_nodelay(self, conn: asyncssh.SSHClientConnection) -> None:
        mode = self._settings.open_session
        version = str(conn.get_extra_info("server_version", ""))
        if mode == "never" or (mode == "auto" and "OpenSSH" not in version):
            return
        try:
            async with asyncio.timeout(_NUDGE_TIMEOUT_S):
                # The key's forced command replaces "true"; either way it exits at once.
                result = await conn.run("true", check=False)
            self._log.debug("tunnel.session_opened", exit_status=result.exit_status)
        except (OSError, asyncssh.Error, TimeoutError) as exc:
            self._log.warning(
                "tunnel.session_refused",
                error=describe(exc),
                consequence="small forwarded responses may wait ~40 ms (Nagle, docs/deploy.md)",
            )

    def _mark_up(self, conn: asyncssh.SSHClientConnection) -> None:
        s = self._settings
        self._up_since = self._clock()
        self._forwarded_once = True
        self.cipher = conn.get_extra_info("send_cipher")
        self.connects += 1
        self.last_error = None
        self._kick.clear()
        self._down.clear()
        self._up.set()
        self._log.info(
            "tunnel.up",
            remote_bind=s.remote_bind,
            model_server=s.upstream,
            server_version=conn.get_extra_info("server_version"),
            cipher=self.cipher,
            reconnects=self.connects - 1,
        )
        self._board.tunnel_up(self.connects, self.edge)

    def _mark_down(self, reason: str) -> None:
        uptime = self._clock() - self._up_since
        self.last_down_reason = reason
        self._up.clear()
        self._down.set()
        self._log.warning("tunnel.down", cause=reason, uptime_s=round(uptime, 3))
        self._board.tunnel_down(reason, self.edge)

    def _after_failure(self, err: TunnelError) -> float:
        self.last_error = err
        self.failures[type(err).__name__] += 1
        self._down.set()
        if err.kind == "permanent":
            self._log.error("tunnel.failed", kind=err.kind, error=err.message, fix=err.fix or None)
            delay = self.backoff.at_cap()
        elif isinstance(err, ForwardRefused):
            self._log.info("tunnel.forward_refused", error=err.message)
            delay = self.backoff.next_delay()
        else:
            self._log.warning("tunnel.failed", kind=err.kind, error=err.message)
            delay = self.backoff.next_delay()
        self._board.tunnel_failed(err, self.edge)
        return delay

    async def _sleep_for(self, delay: float) -> None:
        await self._sleep(delay)

    async def _pause(self, delay: float) -> None:
        """Wait `delay` seconds, or less if `reconnect_now()` is called."""
        if self._kick.is_set():
            self._kick.clear()
            return
        async with asyncio.TaskGroup() as tg:
            sleeper = tg.create_task(self._sleep_for(delay))
            kicked = tg.create_task(self._kick.wait())
            await asyncio.wait((sleeper, kicked), return_when=asyncio.FIRST_COMPLETED)
            sleeper.cancel()
            kicked.cancel()
        self._kick.clear()
