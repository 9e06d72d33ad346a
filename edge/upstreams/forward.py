"""One agent's connection on the embedded SSH server, and the forward it holds.

`listen()` binds the agent's forward as asyncssh's `forward_local_port` does, with `_Forwarder`s:
asyncssh's own forwarder closes a socket it accepted only when its channel fails to open with
`ChannelOpenError`; when the agent's connection dies (a SIGKILL, a cut path) while a channel is
opening, the socket stayed open until garbage collection. Here every accepted socket is tracked
by its agent, and `AgentConnection.release()` closes them all with the connection.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import asyncssh
from asyncssh.forward import SSHLocalPortForwarder
from asyncssh.listener import create_tcp_local_listener


@dataclass(eq=False)
class AgentConnection:
    """One authenticated agent connection and what it holds."""

    conn: asyncssh.SSHServerConnection
    fingerprint: str = ""
    name: str = ""  # its agent's name (`edge.upstreams.sshd.agent_names`)
    peer: str = ""
    bound: bool = False
    closed: asyncio.Event = field(default_factory=asyncio.Event)
    listener: asyncssh.SSHListener | None = None
    forwarders: set[_Forwarder] = field(default_factory=set)

    def release(self) -> None:
        """The connection ended: close its listener and every socket accepted on it."""
        if self.listener is not None:
            self.listener.close()
        for forwarder in list(self.forwarders):
            forwarder.close()


class _Forwarder(SSHLocalPortForwarder):
    """asyncssh's forwarder for one accepted connection, which also closes that socket when its
    channel cannot open for any reason, not only `ChannelOpenError`.

    asyncssh's own closes it only on `ChannelOpenError`: when the agent's connection dies (a
    SIGKILL, a cut path) while a channel is opening, the task ends another way or never, and
    the accepted socket stayed open until garbage collection. Each is kept in its agent's
    `forwarders` until closed, so the agent's end closes them all.
    """

    def __init__(
        self,
        conn: asyncssh.SSHServerConnection,
        coro: Callable[..., Awaitable[Any]],
        live: set[_Forwarder],
    ) -> None:
        super().__init__(conn, coro)
        self._live = live

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._live.add(self)
        super().connection_made(transport)

    def close(self) -> None:
        self._live.discard(self)
        super().close()

    async def _forward(self, *args: object) -> None:
        try:
            await super()._forward(*args)
        except BaseException:
            self.close()
            raise


async def listen(
    agent: AgentConnection, host: str, port: int, asked_host: str, asked_port: int
) -> asyncssh.SSHListener:
    """Bind `host`:`port` (0: any free port) for the agent's forward of `asked_host`:
    `asked_port`, what `conn.forward_local_port` does, with `_Forwarder`s. Each channel names
    the address the agent asked for, which is how its client finds the forward; where the edge
    bound it is the edge's business.

    Error handling: raises `OSError` when the port cannot be bound.
    """
    conn = agent.conn

    async def tunnel(session_factory: Any, orig_host: str, orig_port: int) -> Any:
        return await conn.create_connection(
            session_factory, asked_host, asked_port, orig_host, orig_port
        )

    loop = asyncio.get_running_loop()
    listener = await create_tcp_local_listener(
        conn, loop, lambda: _Forwarder(conn, tunnel, agent.forwarders), host, port
    )
    agent.listener = listener
    return listener
