"""The tunnel hop in-process: the edge's HTTP client opens an agent's SSH channel itself.

In embedded mode each agent's forward is a loopback listener (`edge.upstreams.forward`): every
upstream connection of the edge's client went out through the kernel to that listener, inside
the same process, where asyncssh read it again and wrote it to the agent's channel. Each
request paid for a socket pair and two more trips through the event loop and the kernel, about
70 µs of the edge's CPU (issue 15's measurement), for bytes that never leave the process.

The edge's connector (`edge.upstreams.connections.Connector`, aiohttp's `TCPConnector`) makes a
connection to an address where an agent's forward is bound (`Tunnels`, kept by the SSH server
as forwards come and go) the agent's channel itself (`open_channel`), opened with
`conn.create_connection()` as the listener would open it.
An asyncssh channel has the transport methods aiohttp's protocol uses (write, writelines,
pause_reading, close, abort, is_closing, get_extra_info), so aiohttp's own `ResponseHandler`
reads from it unchanged, and everything above it is as before: the pool and its keep-alive, the
resend on a dead reused connection, the read timeout, closing the connection to stop a
generation. Any other address (system-sshd mode, a plain upstream) is an ordinary TCP
connection. The listener stays bound for everything else on the VPS that uses the forward.

Two things a channel does unlike a socket are bridged in `_Session`: the model server's close
(the agent's EOF) closes the channel, as asyncio closes a transport, so a dead kept-alive
connection is never handed to a request; and a channel the agent refuses because its model
server is down is the error a connection accepted and then closed was (502, not "agent absent").
The connector overrides aiohttp's `TCPConnector._create_connection`, and this module uses its
`ResponseHandler`, neither of them public: `pyproject.toml` holds aiohttp below 4, and
tests/test_channels.py (with every embedded-mode test) fails if either changes shape.

Flow control is the channel's: when aiohttp's reader falls behind it pauses reading, the SSH
window stops opening, and the agent stops reading from the model server; when the channel's
send buffer is full, asyncssh pauses the writer as a socket would.

Resource handling: a channel belongs to aiohttp's connection, which closes it; it also ends
with its agent's SSH connection (its protocol then sees `connection_lost`, as a socket's would).
"""

from __future__ import annotations

import asyncio
import errno
from dataclasses import dataclass
from functools import partial
from typing import Any

import aiohttp
import asyncssh
from aiohttp.client_proto import ResponseHandler

# Until one of its channels has opened, a refused one is asked again after each of these pauses:
# the first channels can overtake the agent's own note of its forward. An asyncssh client
# records the forward only when its request's coroutine resumes, after the grant arrived, and
# refuses a channel that comes before ("No such listener"); OpenSSH records it before asking.
# The loopback listener's extra hops used to hide this.
_FIRST_CHANNEL_PAUSES_S = (0.005, 0.02, 0.08, 0.2)
_NOT_YET = "No such listener"  # asyncssh's reason for that refusal
# The address a tunnel channel says it comes from: the edge's own loopback, as an accepted
# socket's peer would be (agents log it; none acts on it).
_ORIGIN = ("127.0.0.1", 0)


@dataclass(eq=False, slots=True)
class Tunnel:
    """Where one agent's forward leads: its SSH connection, and the address it asked to have
    forwarded (what each of its channels must name)."""

    conn: asyncssh.SSHServerConnection
    asked_host: str
    asked_port: int
    opened: bool = False  # a channel opened: the agent knows of its forward


class Tunnels:
    """The bound forwards, by the loopback (host, port) each listens on."""

    def __init__(self) -> None:
        self._by_address: dict[tuple[str, int], Tunnel] = {}

    def add(self, host: str, port: int, tunnel: Tunnel) -> None:
        self._by_address[(host.lower(), port)] = tunnel

    def remove(self, host: str, port: int, conn: asyncssh.SSHServerConnection) -> None:
        """Forget the forward at `host`:`port` if `conn` still holds it (a newer connection of
        the same agent may hold it already)."""
        key = (host.lower(), port)
        tunnel = self._by_address.get(key)
        if tunnel is not None and tunnel.conn is conn:
            del self._by_address[key]

    def get(self, host: str | None, port: int | None) -> Tunnel | None:
        if host is None or port is None:
            return None
        return self._by_address.get((host.lower(), port))


class _Session(asyncssh.SSHTCPSession[bytes]):
    """Hands the channel's events to aiohttp's protocol, as a socket's transport would."""

    __slots__ = ("_chan", "_protocol")

    def __init__(self, protocol: ResponseHandler) -> None:
        self._protocol = protocol
        self._chan: Any = None

    def connection_made(self, chan: Any) -> None:
        self._chan = chan
        self._protocol.connection_made(chan)

    def data_received(self, data: bytes, datatype: asyncssh.DataType) -> None:
        self._protocol.data_received(data)

    def eof_received(self) -> bool:
        # The model server closed its end. asyncio closes a transport whose protocol's
        # eof_received returns false, and aiohttp counts on that; asyncssh would only send EOF
        # back and wait for the agent's close. Closed here: the connection is not reused
        # (`is_closing()` at once), and aiohttp hears `connection_lost` as from a socket.
        self._protocol.eof_received()
        self._chan.close()
        return True

    def connection_lost(self, exc: Exception | None) -> None:
        self._protocol.connection_lost(exc)

    def pause_writing(self) -> None:
        self._protocol.pause_writing()

    def resume_writing(self) -> None:
        self._protocol.resume_writing()


async def open_channel(tunnel: Tunnel, req: aiohttp.ClientRequest) -> ResponseHandler:
    """aiohttp's protocol on a new channel of `tunnel`, for `req` (what
    `edge.upstreams.connections.Connector` makes of a connection to a bound forward).

    Error handling: raises what a socket's connect would: `ClientConnectorError` when the agent's
    connection is going (the agent is absent), `ClientOSError` when the agent refused the
    channel because its model server did not answer (accepted, then closed).
    """
    pauses = iter(_FIRST_CHANNEL_PAUSES_S)
    while True:
        protocol = ResponseHandler(asyncio.get_running_loop())
        try:
            await tunnel.conn.create_connection(
                partial(_Session, protocol), tunnel.asked_host, tunnel.asked_port, *_ORIGIN
            )
        except asyncssh.ChannelOpenError as exc:
            if exc.reason == _NOT_YET and not tunnel.opened:
                pause = next(pauses, None)
                if pause is not None:
                    await asyncio.sleep(pause)  # the agent has not noted its forward yet
                    continue
            # The agent is there and answered: it could not reach its model server. Through
            # the listener that was a connection accepted, then closed: the same error.
            raise aiohttp.ClientOSError(
                errno.ECONNRESET, f"the agent could not open its model server: {exc.reason}"
            ) from exc
        except (asyncssh.Error, OSError) as exc:  # the agent's connection is going
            raise _refused(req, exc) from exc
        tunnel.opened = True
        return protocol


def _refused(req: aiohttp.ClientRequest, exc: Exception) -> aiohttp.ClientConnectorError:
    """What a refused connect would be: the agent is not (or no longer) there."""
    return aiohttp.ClientConnectorError(
        req.connection_key,
        ConnectionRefusedError(errno.ECONNREFUSED, f"the agent's channel: {exc}"),
    )
