"""Relaying a streamed answer: the upstream is read at its pace, the client written at its own.

Why it is shaped like this. Writing each upstream chunk to the client before reading the next
ties the GPU slot to the client's speed: a phone on a poor link, or a reader that stopped
reading, would hold one of the GPU's few slots for as long as it dawdled. So the handler's task
reads the upstream at the upstream's pace, always, and the moment the upstream ends calls
`on_upstream_end` (the caller releases the GPU slot there and records the answer's figures).
While the client keeps up, the same task writes each chunk straight to it: a chunk is written
only if it fits in the connection's send buffer below the high-water mark, where aiohttp's
write cannot block, so there is no hand-off and no added latency. The first chunk that does
not fit starts a writer task (in a TaskGroup that `relay()` owns) and from then on chunks go
through a bounded buffer, which the writer empties whenever the client takes more, several
chunks to a write. (A first version handed every chunk to a writer task. Measured on a quiet
machine the extra event-loop turn was within noise, docs/performance.md, but the direct path
does less per chunk and leaves a fast reader on exactly the seed relay's path.)

Back-pressure. The buffer holds `buffer_bytes` (plus at most one chunk). When it is full the
reader waits for the writer, and so the upstream waits, slot and all. That is a choice: the
other one, dropping the client, would lose answers for clients that are merely slow, and with
the edge's output cap a whole answer is far smaller than the default buffer, so a full buffer
means an operator raised one setting past the other. A client that stops reading is still cut,
by the write timeout, wherever it stops.

Stalls. Each write to the client may block for at most `write_timeout`; aiohttp blocks a write
only when the connection's send buffers are full, so that is the time the client took to accept
about 48 KiB. Past it the client has stalled: the reader is cancelled (which closes the upstream
connection, and Ollama stops generating), the connection is aborted, and the outcome is
`CLIENT_STALLED`. The kernel's own buffers take a few MB before any of this begins: a client
that stops reading a shorter answer simply leaves it there, and holds nothing of ours.

Counting. The reader also counts the generated tokens as they pass (`edge.proxy.usage.TokenCount`,
one per line with text) and changes nothing: the caller charges that count when the upstream
reported no usage (an OpenAI-style stream the client did not ask usage for) or never reached
its final figures (a stream cut short). The time the first counted token passed is the start
of the generation clock and the end of the time to first token (`StreamFacts.first_token`).
Why count rather than ask the upstream for usage and drop it from the stream: `edge.proxy.usage`.

Resource handling: the reader releases the upstream response when it was read to the end and
closes it on any other exit; the caller's own `with` blocks stay the owners of the response and
the slot, so both are also let go if anything here fails.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

import aiohttp
import orjson
from aiohttp import web

from edge.proxy.usage import TokenCount

# The end of a stream kept to read its final figures: Ollama's last NDJSON line or the SSE usage
# chunk is a few hundred bytes; 16 KiB also covers a final chunk that still carries content.
TAIL_BYTES = 16 * 1024
# A writer that fell behind sends what piled up in writes of about this size: few system calls,
# no copy of the whole buffer at once.
_WRITE_BYTES = 64 * 1024
# Bytes aiohttp adds to a chunk on the wire (chunked encoding: hex size and two CRLFs).
_CHUNK_FRAMING = 16


class Outcome(enum.Enum):
    COMPLETE = "ok"
    UPSTREAM_BROKEN = "upstream_broken"  # the upstream failed mid-answer; the client was told
    CLIENT_STALLED = "client_stalled"  # the client stopped taking the answer; it was cut


class Tail:
    """The last `TAIL_BYTES` (or a little more) of a stream, kept without copying chunks."""

    __slots__ = ("_chunks", "_size")

    def __init__(self) -> None:
        self._chunks: deque[bytes] = deque()
        self._size = 0

    def add(self, chunk: bytes) -> None:
        self._chunks.append(chunk)
        self._size += len(chunk)
        while self._size - len(self._chunks[0]) >= TAIL_BYTES:
            self._size -= len(self._chunks.popleft())

    def bytes(self) -> bytes:
        return b"".join(self._chunks)


@dataclass(eq=False, slots=True)
class StreamFacts:
    """What the relay saw, filled in as it goes: the caller reads it however the relay ended."""

    tail: Tail = field(default_factory=Tail)
    count: TokenCount = field(default_factory=TokenCount)  # tokens seen generated, so far
    # perf_counter() when the first generated token came: not the first chunk, which may be a
    # comment (llama.cpp's `: ping` while it reads a long prompt or waits for a slot) or a chunk
    # with only a role; the generation clock and the time to first token start here.
    first_token: float | None = None
    upstream_end: float | None = None  # perf_counter() when the upstream finished or broke
    broken: bool = False  # the upstream failed mid-answer
    bytes_out: int = 0  # handed to the client's connection


class _Buffer:
    """Chunks on their way from the upstream reader to the client writer, bounded in bytes."""

    __slots__ = ("_chunks", "_closed", "_limit", "_readable", "_size", "_writable")

    def __init__(self, limit: int) -> None:
        self._chunks: deque[bytes] = deque()
        self._size = 0
        self._limit = limit
        self._closed = False
        self._readable = asyncio.Event()
        self._writable = asyncio.Event()

    async def put(self, chunk: bytes) -> None:
        """Add `chunk`, first waiting while the buffer is full (back-pressure)."""
        while self._size >= self._limit:
            self._writable.clear()
            await self._writable.wait()
        self._chunks.append(chunk)
        self._size += len(chunk)
        self._readable.set()

    def close(self) -> None:
        """No more chunks: `take()` returns b"" once the buffer is empty."""
        self._closed = True
        self._readable.set()

    async def take(self) -> bytes:
        """The oldest chunk, or those that piled up joined into one; b"" at the end."""
        while not self._chunks:
            if self._closed:
                return b""
            self._readable.clear()
            await self._readable.wait()
        data = self._chunks.popleft()
        if self._chunks and len(data) < _WRITE_BYTES:
            parts = [data]
            size = len(data)
            while self._chunks and size < _WRITE_BYTES:
                parts.append(self._chunks.popleft())
                size += len(parts[-1])
            data = b"".join(parts)
        self._size -= len(data)
        self._writable.set()
        return data


class _ClientStalled(Exception):
    """The client took nothing for `write_timeout`: raised in the writer to stop the reader."""


async def relay(
    request: web.Request,
    response: web.StreamResponse,
    upstream: aiohttp.ClientResponse,
    facts: StreamFacts,
    *,
    sse: bool,
    buffer_bytes: int,
    write_timeout: float,
    on_upstream_end: Callable[[], None],
) -> Outcome:
    """Relay `upstream`'s body to the prepared `response`, decoupled by a bounded buffer.

    `on_upstream_end` is called once, as soon as the upstream finished or broke (never when
    the relay is cancelled first); it must not raise.

    Error handling: the client going away surfaces as it does from `response.write()`
    (`ConnectionResetError`, or cancellation of the handler); the upstream is then cancelled.
    An upstream failure after the headers ends the stream with an error line in the stream's
    own shape (`UPSTREAM_BROKEN`), so a truncated answer never looks complete.
    """
    buffer = _Buffer(buffer_bytes)
    gone: BaseException | None = None
    try:
        async with asyncio.TaskGroup() as tasks:
            await _read(request, response, upstream, buffer, facts, tasks, write_timeout)
            on_upstream_end()
    except BaseExceptionGroup as group:  # the writer task failed; the reader was cancelled
        _, rest = group.split(_ClientStalled)
        if rest is not None:  # the client went away (or a bug): not a stall
            gone = rest.exceptions[0] if len(rest.exceptions) == 1 else rest
    else:
        if facts.broken:
            await _write_stream_error(request, response, sse)
            return Outcome.UPSTREAM_BROKEN
        try:
            async with asyncio.timeout(write_timeout):
                await response.write_eof()
            return Outcome.COMPLETE
        except TimeoutError:
            pass
    if gone is not None:
        raise gone  # outside the except block: the middleware sees the client's own error
    # Only now that the reader has finished: an abort makes aiohttp cancel the handler.
    if request.transport is not None:
        request.transport.abort()  # not close(): that would wait for the client to read
    return Outcome.CLIENT_STALLED


async def _read(
    request: web.Request,
    response: web.StreamResponse,
    upstream: aiohttp.ClientResponse,
    buffer: _Buffer,
    facts: StreamFacts,
    tasks: asyncio.TaskGroup,
    write_timeout: float,
) -> None:
    """Read the upstream to its end, writing to the client directly while it keeps up.

    A chunk is written by this task only if it fits in the connection's send buffer below
    the high-water mark, where aiohttp's write cannot block. The first chunk that does not fit
    starts the writer task, and from then on every chunk goes through the buffer.
    """
    transport = request.transport
    high = transport.get_write_buffer_limits()[1] if transport is not None else 0
    writer: asyncio.Task[None] | None = None
    try:
        async for chunk in upstream.content.iter_any():
            facts.tail.add(chunk)
            facts.count.feed(chunk)
            if facts.first_token is None and facts.count.tokens:
                facts.first_token = time.perf_counter()
            if writer is None and (
                transport is None
                or transport.get_write_buffer_size() + len(chunk) + _CHUNK_FRAMING < high
            ):
                await response.write(chunk)  # the client keeps up: no hand-off, no delay
                facts.bytes_out += len(chunk)
                continue
            if writer is None:
                writer = tasks.create_task(_write(response, buffer, facts, write_timeout))
            await buffer.put(chunk)
    except (aiohttp.ClientError, TimeoutError):
        facts.broken = True
        upstream.close()
    except BaseException:
        upstream.close()  # cancelled: a closed connection is how Ollama learns to stop
        raise
    else:
        upstream.release()
    facts.upstream_end = time.perf_counter()
    buffer.close()


async def _write(
    response: web.StreamResponse, buffer: _Buffer, facts: StreamFacts, write_timeout: float
) -> None:
    """Send the buffer's chunks as the client takes them.

    Error handling: raises `_ClientStalled` when a write waits longer than `write_timeout`.
    """
    while chunk := await buffer.take():
        try:
            async with asyncio.timeout(write_timeout):
                await response.write(chunk)
        except TimeoutError:
            raise _ClientStalled from None
        facts.bytes_out += len(chunk)


async def _write_stream_error(
    request: web.Request, response: web.StreamResponse, sse: bool
) -> None:
    message, kind = "the model server's stream broke off", "upstream_broken"
    if sse:
        line = b"data: " + orjson.dumps({"error": {"message": message, "type": kind}}) + b"\n\n"
    else:
        line = orjson.dumps({"error": message, "type": kind}) + b"\n"
    with contextlib.suppress(ConnectionError):  # the client may be gone as well
        await response.write(line)
    if request.transport is not None:
        request.transport.close()
