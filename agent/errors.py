"""Why a tunnel attempt or session ended, and whether to retry soon or only at the cap.

```
shared.errors.BackhaulError
└── TunnelError                    kind, fix (what the operator should do, or "")
    ├── TunnelTransient            retried with full-jitter backoff
    │   ├── ConnectFailed          TCP connect, handshake or login timed out or was refused
    │   ├── ConnectionDropped      an established connection ended (keepalive timeout, reset,
    │   │                          server restart, disconnect)
    │   └── ForwardRefused         tcpip-forward refused after an earlier success: the old
    │                              session still holds the port until sshd reaps it
    └── TunnelPermanent            the operator must fix something; retried only at the cap
        ├── HostKeyRejected        the VPS's host key is not the pinned one
        ├── AuthRefused            the VPS does not accept the agent's key
        ├── ForwardMisconfigured   tcpip-forward refused on the very first connect
        ├── Replaced               another agent with the same key took the tunnel over
        └── LocalConfigError       the agent's key or known_hosts file is unreadable
```

`classify()` is the one place asyncssh and OS exceptions are translated, by the TRANSIENT and
PERMANENT tables below. `asyncssh.ChannelListenError` derives from `Exception`, not from
`asyncssh.Error`: an `except asyncssh.Error` would miss the most common reconnect failure, so it
is named in the table.
"""

from __future__ import annotations

from typing import ClassVar

import asyncssh

from shared.errors import BackhaulError, ConfigError
from shared.protocol import REPLACED_REASON


class TunnelError(BackhaulError):
    """One attempt or session ended; `fix` tells the operator what to change, if anything."""

    kind: ClassVar[str] = "transient"

    def __init__(self, message: str, fix: str = "") -> None:
        super().__init__(message)
        self.message = message
        self.fix = fix


class TunnelTransient(TunnelError):
    kind = "transient"


class ConnectFailed(TunnelTransient):
    pass


class ConnectionDropped(TunnelTransient):
    pass


class ForwardRefused(TunnelTransient):
    pass


class TunnelPermanent(TunnelError):
    kind = "permanent"


class HostKeyRejected(TunnelPermanent):
    pass


class AuthRefused(TunnelPermanent):
    pass


class ForwardMisconfigured(TunnelPermanent):
    pass


class Replaced(TunnelPermanent):
    pass


class LocalConfigError(TunnelPermanent):
    pass


# Checked in order, first match wins: permanent first, since its asyncssh classes derive from
# DisconnectError, which is transient.
PERMANENT: tuple[tuple[type[BaseException], type[TunnelPermanent]], ...] = (
    (asyncssh.HostKeyNotVerifiable, HostKeyRejected),
    (asyncssh.PermissionDenied, AuthRefused),
    (ConfigError, LocalConfigError),
)
TRANSIENT: tuple[tuple[type[BaseException], type[TunnelTransient]], ...] = (
    (asyncssh.ChannelListenError, ForwardRefused),  # not an asyncssh.Error
    (asyncssh.ConnectionLost, ConnectionDropped),  # includes keepalive and login timeouts
    (asyncssh.DisconnectError, ConnectionDropped),
    (asyncssh.Error, ConnectionDropped),
    (OSError, ConnectFailed),  # refused, unreachable, TimeoutError (connect_timeout)
)
# Every exception `classify` knows, for an `except` around code whose failures it translates.
TRANSLATED: tuple[type[BaseException], ...] = tuple(source for source, _ in PERMANENT + TRANSIENT)


def classify(exc: BaseException, fixes: dict[type[TunnelError], str]) -> TunnelError:
    """Translate `exc` by the tables; `fixes` holds the operator hint for each class.

    Error handling: an exception in neither table is not ours to judge and is re-raised
    (a bug should reach the task group, not be retried forever).
    """
    if isinstance(exc, TunnelError):
        return exc
    if isinstance(exc, asyncssh.DisconnectError) and REPLACED_REASON in exc.reason:
        return Replaced(f"{exc.reason}", fixes.get(Replaced, ""))
    for table in (PERMANENT, TRANSIENT):
        for source, ours in table:
            if isinstance(exc, source):
                return ours(describe(exc), fixes.get(ours, ""))
    raise exc


def describe(exc: BaseException | None) -> str:
    """A short human reason: the asyncssh reason text, or the OS error, or the class name."""
    if exc is None:
        return "closed by the server"
    if isinstance(exc, asyncssh.DisconnectError):
        return exc.reason or type(exc).__name__
    if isinstance(exc, TimeoutError):
        return "timed out"
    if isinstance(exc, BackhaulError):
        return str(exc)
    text = str(exc)
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__
