"""systemd's notify protocol, by hand: one datagram per message to `$NOTIFY_SOCKET`.

Both programs use it. The agent sends `READY=1` once the first forward is up, the edge once it
listens (`Type=notify` holds dependants until then); `STATUS=`
on every state change (shown by `systemctl status`), `WATCHDOG=1` from the event loop at half
of `$WATCHDOG_USEC` (so a wedged loop is restarted, not just a dead process), `STOPPING=1` on
SIGTERM. Outside systemd every call is a no-op, and so on a system without AF_UNIX datagram
sockets (Windows; the agent runs there too). The protocol is a few lines (sd_notify(3)), so
there is no dependency for it.
"""

from __future__ import annotations

import asyncio
import os
import socket
from collections.abc import Awaitable, Callable

import structlog
from pydantic_settings import BaseSettings, SettingsConfigDict

log = structlog.get_logger(__name__)


class SystemdEnv(BaseSettings):
    """What systemd tells a `Type=notify` service through its environment (sd_notify(3))."""

    model_config = SettingsConfigDict(frozen=True, extra="ignore", env_prefix="")

    notify_socket: str | None = None
    watchdog_usec: int | None = None
    watchdog_pid: int | None = None


class Notifier:
    """Sends notify messages; silent when not started by systemd."""

    def __init__(
        self,
        notify_socket: str | None,
        watchdog_usec: int | None = None,
        watchdog_pid: int | None = None,
    ) -> None:
        self._address: str | bytes | None = None
        if notify_socket and hasattr(socket, "AF_UNIX"):
            # A leading "@" names a Linux abstract socket, spelled with a NUL byte.
            self._address = (
                b"\0" + notify_socket[1:].encode() if notify_socket[0] == "@" else notify_socket
            )
        mine = watchdog_pid is None or watchdog_pid == os.getpid()
        self.watchdog_interval: float | None = (
            watchdog_usec / 2e6 if watchdog_usec and mine and self._address else None
        )
        self._sock: socket.socket | None = None
        self._failed = False

    @classmethod
    def from_env(cls, env: SystemdEnv) -> Notifier:
        return cls(env.notify_socket, env.watchdog_usec, env.watchdog_pid)

    def send(self, *fields: str) -> bool:
        """Send `KEY=value` fields in one datagram; False when there is no socket or it failed."""
        if self._address is None:
            return False
        message = "\n".join(f.replace("\n", " ") for f in fields).encode()
        try:
            if self._sock is None:
                self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)  # not inherited
                self._sock.setblocking(False)
            self._sock.sendto(message, self._address)
        except OSError as exc:
            if not self._failed:  # once: a broken socket would otherwise log every status
                log.warning("notify.failed", error=str(exc))
                self._failed = True
            return False
        return True

    def ready(self, status: str = "") -> bool:
        return self.send("READY=1", f"STATUS={status}") if status else self.send("READY=1")

    def status(self, text: str) -> bool:
        return self.send(f"STATUS={text}")

    def stopping(self) -> bool:
        return self.send("STOPPING=1")

    async def run_watchdog(self, sleep: Callable[[float], Awaitable[None]] = asyncio.sleep) -> None:
        """Ping the watchdog forever from this event loop; returns at once if there is none."""
        if self.watchdog_interval is None:
            return
        log.info("notify.watchdog", interval_s=self.watchdog_interval)
        while True:
            self.send("WATCHDOG=1")
            await sleep(self.watchdog_interval)

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None
