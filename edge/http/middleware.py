"""The outermost middleware: one `Exchange` per request, one telemetry line, one error shape.

It checks the raw path (`edge.routes.routable`), answers CORS preflights, binds the
request id to every log event of the request (`shared.logging.REQUEST_ID`), renders every
`EdgeError` in the route's own error shape, turns anything unexpected into a logged 500 with no
traceback for the client, records a client that went away as `client_gone`, and writes exactly
one telemetry line per request (or, for anonymous refusals past their burst, counts it:
`edge.policy.guard`).
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

import structlog
from aiohttp import hdrs, web

from edge.errors import (
    EdgeError,
    InternalError,
    MethodNotAllowed,
    NotFound,
    PayloadTooLarge,
    UnsupportedMediaType,
    render,
)
from edge.exchange import EXCHANGE, Exchange, request_id
from edge.http import cors
from edge.proxy.features import FEATURE, lookup
from edge.record import RequestRecord
from edge.routes import BY_PATH, OPEN_PATHS, UNLOGGED_PATHS, UNSERVED, routable
from edge.services import EDGE
from shared.logging import REQUEST_ID

log = structlog.get_logger(__name__)

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


@web.middleware
async def exchange_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    edge = request.app[EDGE]
    path = request.raw_path.partition("?")[0]
    client, via_proxy = edge.clients.resolve(request)
    record = RequestRecord(
        id=request_id(request.headers.get("X-Request-Id")),
        method=request.method,
        route=path[:256],
        client=client,
    )
    ex = Exchange(path=path, record=record, via_proxy=via_proxy)
    request[EXCHANGE] = ex
    bound = REQUEST_ID.set(ex.id)
    try:
        response = await _dispatch(request, handler, ex)
        ex.record.status = response.status
        return response
    except EdgeError as err:
        return _fail(ex, err)
    except web.HTTPException as exc:
        return _fail(ex, _translate_http_exception(exc))
    except (asyncio.CancelledError, ConnectionResetError):  # the client went away
        ex.record.outcome = "client_gone"
        ex.record.status = ex.record.status or 499  # nginx's "client closed request"
        raise
    except Exception:
        log.exception("edge.internal_error", path=ex.path)
        return _fail(ex, InternalError("internal error; the request id is in the logs"))
    finally:
        ex.record.elapsed_ms = round(ex.elapsed_ms(), 3)
        if ex.record.overhead_ms is None and ex.route is not None:
            ex.record.overhead_ms = round(ex.overhead_ms(), 3)
        if path not in UNLOGGED_PATHS and not ex.aggregated:
            edge.telemetry.write(ex.record)
        edge.metrics.observe(ex.record)  # never raises
        REQUEST_ID.reset(bound)


def _fail(ex: Exchange, err: EdgeError) -> web.Response:
    if ex.headers_sent:  # too late for a status: abort instead (aiohttp closes the connection)
        raise err
    ex.record.status, ex.record.type = err.status, err.type
    ex.record.outcome = "error"
    return render(ex.path, err, ex.id)


def _translate_http_exception(exc: web.HTTPException) -> EdgeError:
    if isinstance(exc, web.HTTPMethodNotAllowed):
        return MethodNotAllowed(f"method not allowed; use {', '.join(sorted(exc.allowed_methods))}")
    if isinstance(exc, web.HTTPRequestEntityTooLarge):
        return PayloadTooLarge("the request body is too large")
    if isinstance(exc, web.HTTPNotFound):
        return NotFound("no such route")
    err = EdgeError(exc.reason)
    err.status, err.type = exc.status, "http_error"
    return err


async def _dispatch(request: web.Request, handler: Handler, ex: Exchange) -> web.StreamResponse:
    edge = request.app[EDGE]
    path = ex.path
    guard = edge.guard
    if path not in OPEN_PATHS:
        guard.check_ban(ex)
    if not routable(path, request.path):
        if hdrs.AUTHORIZATION not in request.headers:  # a scanner's `/.env`: counted past a burst
            guard.anonymous.note(ex, NotFound.type)
        raise NotFound("no such route")
    feature = lookup(edge.features, path)
    if feature is not None:
        request[FEATURE] = feature
        ex.record.feature = feature.name
    preflight = hdrs.ACCESS_CONTROL_REQUEST_METHOD in request.headers
    if request.method == hdrs.METH_OPTIONS and preflight:
        return cors.preflight(request, path, feature)
    ex.route = BY_PATH.get(path)
    await guard.admit(request, ex, feature)
    match = request.match_info
    if match.http_exception is not None:
        if path in UNSERVED:
            raise NotFound(UNSERVED[path])
        raise match.http_exception
    _refuse_encoded_body(request)
    try:
        return await handler(request)
    finally:
        await guard.settle(ex)


def _refuse_encoded_body(request: web.Request) -> None:
    """A compressed body is refused before a byte of it is read: inflating it first would let
    a small upload cost the edge its size limit many times over (a zip bomb)."""
    if not request.body_exists:
        return
    for value in request.headers.getall(hdrs.CONTENT_ENCODING, ()):
        for coding in value.split(","):
            if coding.strip().lower() not in ("", "identity"):
                raise UnsupportedMediaType(
                    f"request bodies must not be compressed (Content-Encoding: "
                    f"{coding.strip()[:32]}); send plain JSON"
                )
