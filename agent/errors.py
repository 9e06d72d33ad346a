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
is named in the table. `operator_fixes()` says, for each class the operator must act on, what to
change, in this agent's own terms (its VPS, key file, bind); `classify()` attaches it.
"""

from __future__ import annotations

from typing import ClassVar

import asyncssh

from agent.settings import AgentSettings
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


def operator_fixes(s: AgentSettings) -> dict[type[TunnelError], str]:
    """What the operator should change for each error class that needs them, for `classify`."""
    vps = f"{s.ssh_host}:{s.ssh_port}"
    return {
        HostKeyRejected: (
            f"the host key of {vps} is not the one pinned in {s.known_hosts}. If the VPS was "
            "reinstalled or its key changed on purpose, read the new fingerprint on the VPS "
            "itself (`ssh-keygen -lf /etc/ssh/ssh_host_ed25519_key.pub`, or the fingerprint in "
            "the edge's `sshd.listening` log line) and replace the line; if not, someone may be "
            "in the middle. Then `systemctl reload backhaul-agent` to retry now."
        ),
        AuthRefused: (
            f"{vps} refused the key {s.key_path} for user {s.ssh_user!r}: add the lines "
            "printed by `backhaul-agent keygen` to that user's authorized_keys (system sshd) "
            "or to the edge's agent-keys file (embedded server), check BACKHAUL_AGENT_SSH_USER, "
            "then `systemctl reload backhaul-agent`."
        ),
        ForwardMisconfigured: (
            f"{vps} would not listen on {s.remote_bind}. System sshd: the key's "
            f'permitlisten="{s.remote_bind}" and the Match block\'s PermitListen must name '
            "it, AllowTcpForwarding must be remote or yes, and nothing else on the VPS may "
            "listen on that port. Embedded server: BACKHAUL_AGENT_REMOTE_BIND must equal the "
            "edge's BACKHAUL_EDGE_UPSTREAM host:port. A previous agent's half-open session "
            "also holds the port until sshd reaps it (ClientAliveInterval)."
        ),
        Replaced: (
            "another agent with the same key connected to the VPS and took the tunnel over: "
            "give every agent its own key (`backhaul-agent keygen`), or stop the other one."
        ),
        LocalConfigError: "fix the file named in the error, then reload (SIGHUP).",
    }


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
