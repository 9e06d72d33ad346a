"""The edge's HTTP server: aiohttp's, with the requests it cannot parse answered the edge's way.

aiohttp answers a request it cannot parse (bare-LF line endings, a bad header, a request line
over the limit) itself, before any middleware runs: `RequestHandler.handle_error` logs it at
ERROR with a traceback and the raw bytes (an `Authorization` header included) and sends a
plain-text 400. Anyone can send such bytes, as fast as they like. Here `handle_error` is
overridden, so every such request becomes:

- for the client, a JSON 400 `bad_http_request` in OpenAI's shape (there is no route to pick
  another shape from) with a fresh request id, and the connection is closed;
- for the operator, one `http.bad_request` event naming the parser's error class and the peer,
  never the bytes or a header, at most `_PER_PEER_PER_MIN` a minute per peer and
  `_ALL_PER_MIN` in all; the next event says how many were left out (`suppressed`).

Why a protocol subclass and not a filter on the `aiohttp.server` logger: a filter can silence
the traceback but cannot change the answer, which would stay plain text; it would also be
process-wide and match on aiohttp's wording. The subclass owns both the answer and the log line
for exactly this server, through the one method aiohttp routes every such error through. It is
installed by `EdgeRunner`, which production (`edge.serve`) and the tests both run the edge with.
No telemetry line is written for these: they never became requests (no route, no id of the
client's), and a flood of them must not rotate the telemetry away.

Every response of this server, these 400s included, says `Server: backhaul` (no version):
`edge.app` sets it on the others.
"""

from __future__ import annotations

import time
from typing import Any

import structlog
from aiohttp import hdrs, web
from aiohttp.web_request import BaseRequest

from edge.errors import BadHttpRequest, EdgeError, InternalError, render
from edge.exchange import request_id
from edge.policy.limits import Buckets

log = structlog.get_logger(__name__)

SERVER_NAME = "backhaul"
# `http.bad_request` events a minute, per peer and in all: a flood is one line every few
# seconds, not a journal filled with tracebacks.
_PER_PEER_PER_MIN = 6
_ALL_PER_MIN = 60
# Peers whose event rate is tracked (the least recent are forgotten first).
_PEERS_TRACKED = 10_000


class BadRequestLog:
    """The `http.bad_request` events, rate-limited per peer and in all."""

    def __init__(self, clock: Any = time.monotonic) -> None:
        self._peers = Buckets(_PEERS_TRACKED, clock)
        self._all = Buckets(1, clock)
        self.suppressed = 0

    def note(self, peer: str | None, error: str) -> None:
        if not self._peers.allows(peer, _PER_PEER_PER_MIN) or not self._all.take(
            "all", _ALL_PER_MIN
        ):
            self.suppressed += 1
            return
        self._peers.take(peer, _PER_PEER_PER_MIN)
        suppressed, self.suppressed = self.suppressed, 0
        log.warning("http.bad_request", client=peer, error=error, suppressed=suppressed)


class EdgeProtocol(web.RequestHandler):
    """aiohttp's protocol handler, answering what it cannot parse in JSON (module docstring)."""

    def __init__(self, manager: EdgeServer, **kwargs: Any) -> None:
        super().__init__(manager, **kwargs)
        self._bad_requests = manager.bad_requests

    def handle_error(
        self,
        request: BaseRequest,
        status: int = 500,
        exc: BaseException | None = None,
        message: str | None = None,
    ) -> web.StreamResponse:
        """The answer to a request that failed outside the edge's middleware.

        A parse error (400) is the client's mistake: one rate-limited event, no traceback.
        Anything else is the edge's own bug (the middleware turns every handler failure into
        an answer): logged with its traceback, as `edge.app` logs the ones it catches.
        """
        if status == 400:
            self._bad_requests.note(request.remote, type(exc).__name__ if exc else "unknown")
            err: EdgeError = BadHttpRequest(
                "the request is not valid HTTP/1.1 (line endings must be CRLF; "
                "see RFC 9112) and was not read"
            )
        else:
            log.error("edge.internal_error", status=status, exc_info=exc)
            err = InternalError("internal error")
            err.status = status
        if request.writer.output_size > 0:  # part of an answer is out: only a cut is left
            raise ConnectionError("a response was already started; cannot send an error")
        response = render("/", err, request_id(None))
        response.headers[hdrs.SERVER] = SERVER_NAME
        response.force_close()
        return response


class EdgeServer(web.Server):
    """aiohttp's server, making an `EdgeProtocol` for each connection."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.bad_requests = BadRequestLog()

    def __call__(self) -> web.RequestHandler:
        return EdgeProtocol(self, loop=self._loop, **self._kwargs)


class EdgeRunner(web.AppRunner):
    """`web.AppRunner` serving the app through `EdgeServer`: run the edge with this."""

    async def _make_server(self) -> web.Server:
        # AppRunner's own server carries the app's handler, request factory and handler
        # arguments; the edge's server is the same but for the protocol class it makes.
        server = await super()._make_server()
        return EdgeServer(
            server.request_handler,
            request_factory=server.request_factory,
            handler_cancellation=server.handler_cancellation,
            loop=server._loop,
            **server._kwargs,
        )
