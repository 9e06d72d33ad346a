"""An attacker on loopback for the connection-limit tests: connections from another source
address (the whole of 127/8 is loopback on Linux), held open or checked for a refusal.

A refused connection is closed by the edge at accept, before it writes a byte: the client reads
end-of-file (or a reset). An admitted one stays open; the SSH port greets it with its version.
"""

from __future__ import annotations

import asyncio
import resource
import socket
from collections.abc import Iterator
from contextlib import contextmanager, suppress

ATTACKER = "127.0.0.2"


def raise_own_fd_limit() -> int:
    """Lift this process's soft descriptor limit to its hard one; return the new soft limit."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


async def connect(
    port: int, source: str = ATTACKER
) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    return await asyncio.open_connection("127.0.0.1", port, local_addr=(source, 0))


async def was_refused(reader: asyncio.StreamReader) -> bool:
    """True when the server closed the connection without a byte; False when it sent one.
    Unbounded: callers add a timeout (an admitted, silent HTTP connection sends nothing)."""
    try:
        return await reader.read(1) == b""
    except ConnectionResetError:
        return True


async def refused(port: int, source: str = ATTACKER) -> bool:
    """Whether a new connection from `source` is closed at once (within 5 s)."""
    reader, writer = await connect(port, source)
    try:
        async with asyncio.timeout(5):
            return await was_refused(reader)
    finally:
        writer.close()


async def http_status(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> int:
    """One `GET /healthz` on an open connection; its status (0: closed without an answer)."""
    writer.write(b"GET /healthz HTTP/1.1\r\nHost: edge\r\n\r\n")
    async with asyncio.timeout(5):
        line = await reader.readline()
    return int(line.split()[1]) if line else 0


def close_all(writers: list[asyncio.StreamWriter]) -> None:
    for writer in writers:
        writer.close()


@contextmanager
def held(port: int, count: int, source: str = ATTACKER) -> Iterator[list[socket.socket]]:
    """`count` non-blocking connections from `source` to `port`, started at once and held
    open (or refused by the server) until the block ends: a flood without a task each."""
    sockets: list[socket.socket] = []
    try:
        for _ in range(count):
            sock = socket.socket()
            sockets.append(sock)
            sock.setblocking(False)
            sock.bind((source, 0))
            sock.connect_ex(("127.0.0.1", port))
        yield sockets
    finally:
        for sock in sockets:
            with suppress(OSError):
                sock.close()
