"""The edge's HTTP connections to the model server: the pool, how long an idle one is kept, and
the one resend on a new connection when a kept-alive one turns out to be dead.

Why a resend at all: a model server may close a kept-alive connection whenever it likes
(llama.cpp's `llama-server` closes after every streamed answer while advertising
`Keep-Alive: timeout=5`; any server closes idle ones on its own schedule, or on a restart). Its
close takes a moment to come back through the tunnel, and a request written onto the connection
in that moment dies before any byte of an answer: the client would get a 502 from a healthy
server. Go's `net/http` client and nginx (`proxy_next_upstream`) resend such a request on a new
connection; so does the edge, once (`send()`).

Why it is safe for POST here: the request failed before any byte of a response arrived, on a
connection the server had already given up, so the server did not start it; and the edge relays
only inference and listing routes, none of which changes the model server's state (`pull`,
`create`, `delete` and the like are never proxied), so even a request the server had read and
dropped would only be computed again, for a client that has seen nothing of the first one.

How the edge knows a connection was reused: the edge's `Connector` notes, on the request's
`Attempt`, whether the connection it gave came from the pool or was opened for it. The resend
goes through a second session whose connector never pools (`force_close`), so it is certain to
be a new connection, never another pooled one that died the same way.

aiohttp already resends an idempotent request (GET) once by itself, on whatever connection the
pool gives; the edge's resend applies when the last connection tried was a reused one, so a GET
is sent at most three times, the last on a new connection, and a POST at most twice.

The edge's own credential to the model server (`upstream_api_key_file`: vLLM or llama-server
started with `--api-key`) is a header of both sessions, so every request and every probe carries
it and none can forget it; it is read once at start (`read_api_key`) and kept out of every log.
A caller's own credential is never sent upstream (`edge.proxy.handler` builds each request's
headers from scratch).

Resource handling: both sessions are opened and closed by `sessions()`, in the app's cleanup
context.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from contextvars import ContextVar
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import structlog
from aiohttp import hdrs
from aiohttp.client_proto import ResponseHandler
from aiohttp.connector import Connection
from aiohttp.http import RawResponseMessage
from pydantic import SecretStr

from edge.record import RequestRecord
from edge.settings import EdgeSettings
from edge.upstreams.channels import Tunnels, open_channel
from shared.secrets import read_key_file

log = structlog.get_logger(__name__)

# Seconds an idle connection stays in the pool: below the idle time of every model server we
# know, so the edge is the one that gives an idle connection up, not the server under a request.
# llama.cpp's llama-server (cpp-httplib): keep-alive timeout 5 s. vLLM (uvicorn):
# timeout_keep_alive 5 s (VLLM_HTTP_TIMEOUT_KEEP_ALIVE). Ollama (Go net/http, an http.Server
# with no IdleTimeout or ReadTimeout in server/routes.go): no idle limit at all. A server that
# closes sooner, or after every answer, is what `send()` is for.
POOL_IDLE_S = 4.0


# How a dead connection shows, before any response: the peer's close, a reset (or a broken pipe)
# while reading or writing, or a write onto a transport aiohttp already saw closing.
_DEAD_CONNECTION = (
    aiohttp.ServerDisconnectedError,
    aiohttp.ClientOSError,
    aiohttp.ClientConnectionResetError,
)


class Attempt:
    """What the connector saw of one request's connection: reused from the pool, or new."""

    __slots__ = ("connections", "reused")

    def __init__(self) -> None:
        self.reused = False
        self.connections = 0  # connections this request was given (aiohttp may resend a GET)


# The request a task is sending (`send()` sets it around its call): the connector notes on it
# whether each connection it gives was pooled or new. A context variable and not aiohttp's
# tracing, which sends seven signals a request for the two this needs (14 µs a request,
# measured: a quarter of what a bare aiohttp server costs to answer one).
_ATTEMPT: ContextVar[Attempt | None] = ContextVar("upstream_attempt", default=None)


class Connector(aiohttp.TCPConnector):
    """aiohttp's connector, which tells the request's `Attempt` whether its connection was
    reused, and whose connection to an agent's bound forward, with `tunnels`, is the agent's SSH
    channel opened in-process (`edge.upstreams.channels`). aiohttp awaits `connect()` in the
    request's own task, so the attempt is the one `send()` set."""

    def __init__(self, tunnels: Tunnels | None, **options: Any) -> None:
        super().__init__(**options)
        self._tunnels = tunnels

    async def connect(
        self,
        req: aiohttp.ClientRequest,
        traces: list[Any],
        timeout: aiohttp.ClientTimeout,  # noqa: ASYNC109
    ) -> Connection:
        attempt = _ATTEMPT.get()
        if attempt is not None:
            attempt.reused = True  # unless `_create_connection` says otherwise
            attempt.connections += 1
        return await super().connect(req, traces, timeout)

    async def _create_connection(
        self,
        req: aiohttp.ClientRequest,
        traces: list[Any],
        timeout: aiohttp.ClientTimeout,  # noqa: ASYNC109
    ) -> ResponseHandler:
        attempt = _ATTEMPT.get()
        if attempt is not None:
            attempt.reused = False
        tunnel = self._tunnels.get(req.host, req.port) if self._tunnels is not None else None
        if tunnel is not None:
            return await open_channel(tunnel, req)
        return await super()._create_connection(req, traces, timeout)


def replayable(exc: BaseException, attempt: Attempt) -> bool:
    """Whether a request that failed with `exc` before its response headers may be sent again:
    it died on a reused connection, by a close or a reset, before any byte of an answer."""
    if not attempt.reused or isinstance(exc, aiohttp.ClientConnectorError):
        return False
    if isinstance(exc, aiohttp.ServerDisconnectedError):
        # aiohttp hands over what it had parsed of an unfinished answer: part of one came.
        return not isinstance(exc.message, RawResponseMessage)
    return isinstance(exc, _DEAD_CONNECTION)


@dataclass(frozen=True, slots=True)
class Sessions:
    """The pooled session every request uses, and the one that only ever opens new
    connections, for the resend."""

    pooled: aiohttp.ClientSession
    fresh: aiohttp.ClientSession


async def send(
    sessions: Sessions,
    record: RequestRecord,
    method: str,
    url: str,
    data: bytes | None,
    headers: dict[str, str],
) -> aiohttp.ClientResponse:
    """Send one request upstream and return its response, headers read; resend it once, on a
    new connection, if a reused one was found dead (module doc). `record.upstream_retries`
    counts the resends, aiohttp's own included.

    Error handling: aiohttp's errors propagate unchanged; `edge.proxy.handler.map_upstream_errors`
    translates them.
    """
    attempt = Attempt()
    noted = _ATTEMPT.set(attempt)
    try:
        return await sessions.pooled.request(method, url, data=data, headers=headers)
    except _DEAD_CONNECTION as exc:
        if not replayable(exc, attempt):
            raise
        log.info(
            "edge.upstream_resend",
            request_id=record.id,
            error=str(exc) or type(exc).__name__,
        )
    finally:
        _ATTEMPT.reset(noted)
        record.upstream_retries = max(0, attempt.connections - 1)
    record.upstream_retries += 1
    return await sessions.fresh.request(method, url, data=data, headers=headers)


def read_api_key(path: Path | None) -> SecretStr | None:
    """The model server's API key from `path` (surrounding whitespace dropped), or None when no
    file is set.

    Error handling: raises `ConfigError` naming the file (never its content) when it cannot be
    read or holds no key: the edge would otherwise start and be refused on every request.
    """
    return read_key_file(path, "BACKHAUL_EDGE_UPSTREAM_API_KEY_FILE")


@asynccontextmanager
async def sessions(
    settings: EdgeSettings, api_key: SecretStr | None = None, tunnels: Tunnels | None = None
) -> AsyncIterator[Sessions]:
    """Open the two sessions to the model server, each sending `api_key` as a bearer token
    when there is one; close them on exit. With `tunnels` (embedded mode), a connection to an
    agent's forward is its SSH channel, opened in-process (`edge.upstreams.channels`)."""
    timeout = aiohttp.ClientTimeout(
        total=None,  # generation has no total bound; silence does (sock_read)
        connect=settings.connect_timeout,
        sock_connect=settings.connect_timeout,
        sock_read=settings.read_timeout,
    )
    options: dict[str, Any] = {
        "timeout": timeout,
        "auto_decompress": False,
        # The model server sets no cookies we want; skipping the jar saves work per request.
        "cookie_jar": aiohttp.DummyCookieJar(),
        "skip_auto_headers": ("User-Agent",),
    }
    if api_key is not None:
        options["headers"] = {hdrs.AUTHORIZATION: f"Bearer {api_key.get_secret_value()}"}
    # Keep-alive matters: through the tunnel a new connection is a new SSH channel, a round
    # trip to the workstation. No per-host limit: the gate bounds what reaches the GPU.
    pooled = Connector(tunnels, limit=0, keepalive_timeout=POOL_IDLE_S)
    fresh = Connector(tunnels, limit=0, force_close=True)
    async with (
        aiohttp.ClientSession(connector=pooled, **options) as a,
        aiohttp.ClientSession(connector=fresh, **options) as b,
    ):
        yield Sessions(a, b)
