"""`create_app(settings)`: the edge's aiohttp application, shared by production and the tests.

The outermost middleware owns each request's `Exchange`: it checks the raw path against the
allowlist, answers CORS preflights, renders every `EdgeError` in the route's own error shape,
turns anything unexpected into a logged 500 without a traceback for the client, records a
client that went away as `client_gone`, and writes exactly one telemetry line per request (but
for anonymous refusals past their address's burst, which `edge.policy.guard` counts instead).
App-wide resources (the upstream `ClientSession`, the telemetry writer, the liveness probe)
live in one cleanup context.
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import AsyncIterator, Awaitable, Callable

import structlog
from aiohttp import hdrs, web

from edge import metrics
from edge.errors import (
    EdgeError,
    Forbidden,
    InternalError,
    MethodNotAllowed,
    NotFound,
    PayloadTooLarge,
    UnsupportedMediaType,
    render,
)
from edge.exchange import EXCHANGE, ClientAddress, Exchange, request_id
from edge.http import demo
from edge.http.protocol import SERVER_NAME
from edge.policy import admission
from edge.policy import guard as auth
from edge.proxy import features
from edge.proxy import handler as proxy
from edge.proxy.body_limits import BodyLimits
from edge.proxy.body_policy import BodyPolicy
from edge.proxy.ollama import ModelPolicy
from edge.record import RequestRecord
from edge.routes import BY_PATH, ROUTES
from edge.settings import EdgeSettings
from edge.state import (
    BODY_LIMITS,
    BODY_POLICY,
    CLIENTS,
    GATE,
    MODELS,
    SESSION,
    SESSIONS,
    SETTINGS,
    TELEMETRY,
    UPSTREAM,
)
from edge.telemetry import TelemetryWriter
from edge.upstreams import connections
from edge.upstreams.gate import Gate
from edge.upstreams.monitor import State, UpstreamMonitor
from edge.upstreams.sshd import ssh_server_ctx

log = structlog.get_logger(__name__)

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]

# Headers a browser on another origin may read (CORS hides every other one).
EXPOSED_HEADERS = ", ".join(
    (
        "X-Tok-Per-S",
        "X-Gen-Time",
        "X-Tokens",
        "X-Request-Id",
        "X-Edge-Overhead-Ms",
        "Retry-After",
        "RateLimit-Limit",
        "RateLimit-Remaining",
        "RateLimit-Reset",
    )
)
ALLOWED_REQUEST_HEADERS = "Authorization, Content-Type, X-Request-Id"
# Seconds a browser may cache a preflight answer.
_PREFLIGHT_MAX_AGE_S = "600"
# Paths whose every hit would flood the telemetry log (probes, scrapers): not logged.
UNLOGGED_PATHS = frozenset({"/healthz", "/readyz", "/metrics"})
# A path is proxied only if it is plain: no encoding, no empty, `.` or `..` segment, no
# trailing slash. Anything else is 404 before routing (see edge.routes).
_PLAIN_PATH = re.compile(r"(/[A-Za-z0-9_\-]+(\.[A-Za-z0-9_\-]+)*)+")


def create_app(settings: EdgeSettings) -> web.Application:
    """Build the edge application; run it with `handler_cancellation=True`."""
    app = web.Application(
        middlewares=[exchange_middleware],
        client_max_size=settings.max_body_bytes,
        # keepalive_timeout is also the deadline for a request's headers (slowloris): aiohttp
        # closes a connection that has not sent a complete header block by then.
        handler_args={
            "max_field_size": 16 * 1024,
            "keepalive_timeout": settings.keepalive_timeout,
            # Never inflate a request body: a 255 KB gzip bomb would cost 157 MiB before the
            # size check; a Content-Encoding is refused 415 instead (_refuse_encoded_body).
            "auto_decompress": False,
        },
    )
    app[SETTINGS] = settings
    app[MODELS] = ModelPolicy(settings.models)
    app[BODY_POLICY] = BodyPolicy(
        app[MODELS], settings.max_output_tokens, settings.max_choices, settings.extra_fields
    )
    app[BODY_LIMITS] = BodyLimits(
        max_prompt_chars=settings.max_prompt_chars,
        max_prompt_words=settings.max_prompt_words,
        max_messages=settings.max_messages,
        max_images=settings.max_images,
    )
    app[GATE] = Gate(
        settings.max_inflight, settings.queue_max, settings.queue_timeout, settings.retry_after
    )
    app[CLIENTS] = ClientAddress(settings.trusted_proxies)
    app.cleanup_ctx.append(_resources)
    app.cleanup_ctx.append(ssh_server_ctx)  # after _resources: it reports to app[UPSTREAM]
    for route in ROUTES:
        app.router.add_route(route.method, route.path, proxy.proxy)
    app.router.add_get("/healthz", healthz, allow_head=True)
    app.router.add_get("/readyz", readyz, allow_head=True)
    auth.setup(app)
    features.setup(app)
    metrics.setup(app)
    admission.setup(app)  # after metrics: it registers the listeners' own
    demo.setup(app)
    app.on_response_prepare.append(_response_headers)
    return app


async def _resources(app: web.Application) -> AsyncIterator[None]:
    settings = app[SETTINGS]
    app[TELEMETRY] = TelemetryWriter(
        settings.telemetry_path, settings.telemetry_max_bytes, settings.telemetry_backups
    )
    monitor = UpstreamMonitor(
        settings.upstream, settings.probe_interval, settings.probe_timeout, settings.retry_after
    )
    app[UPSTREAM] = monitor
    async with connections.sessions(settings) as sessions:
        app[SESSIONS], app[SESSION] = sessions, sessions.pooled
        probe = asyncio.get_running_loop().create_task(monitor.run(sessions.pooled), name="probe")
        try:
            yield
        finally:
            probe.cancel()
            await asyncio.gather(probe, return_exceptions=True)
            await app[TELEMETRY].aclose()


@web.middleware
async def exchange_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    path = request.raw_path.partition("?")[0]
    clients = request.app[CLIENTS]
    record = RequestRecord(
        id=request_id(request.headers.get("X-Request-Id")),
        method=request.method,
        route=path[:256],
        client=clients.of(request),
    )
    ex = Exchange(path=path, record=record, via_proxy=clients.is_proxy(request.remote))
    request[EXCHANGE] = ex
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
        log.exception("edge.internal_error", request_id=ex.id, path=ex.path)
        return _fail(ex, InternalError("internal error; the request id is in the logs"))
    finally:
        ex.record.elapsed_ms = round(ex.elapsed_ms(), 3)
        if ex.record.overhead_ms is None and ex.route is not None:
            ex.record.overhead_ms = round(ex.overhead_ms(), 3)
        if path not in UNLOGGED_PATHS and not ex.aggregated:
            request.app[TELEMETRY].write(ex.record)
        request.app[metrics.METRICS].observe(ex.record)  # never raises


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
    path = ex.path
    guard = request.app[auth.GUARD]
    if path not in auth.OPEN_PATHS:
        guard.check_ban(ex)
    if not _PLAIN_PATH.fullmatch(path) or request.path != path:
        if hdrs.AUTHORIZATION not in request.headers:  # a scanner's `/.env`: counted past a burst
            guard.anonymous.note(ex, NotFound.type)
        raise NotFound("no such route")
    feature = features.lookup(request.app, path)
    if feature is not None:
        request[features.FEATURE] = feature
        ex.record.feature = feature.name
    preflight = hdrs.ACCESS_CONTROL_REQUEST_METHOD in request.headers
    if request.method == hdrs.METH_OPTIONS and preflight:
        return _preflight(request, path, feature)
    ex.route = BY_PATH.get(path)
    guard.admit(request, ex, feature)
    match = request.match_info
    if match.http_exception is not None:
        raise match.http_exception
    _refuse_encoded_body(request)
    try:
        return await handler(request)
    finally:
        guard.settle(ex)


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


def _preflight(request: web.Request, path: str, feature: features.Feature | None) -> web.Response:
    route = BY_PATH.get(path)
    if route is None and feature is None:
        raise NotFound("no such route")
    origin = request.headers.get(hdrs.ORIGIN, "")
    if not _origin_allowed(request, origin):
        raise Forbidden(f"origin '{origin}' is not allowed to call this API from a browser")
    method = route.method if route is not None else hdrs.METH_POST
    return web.Response(
        status=204,
        headers={
            hdrs.ACCESS_CONTROL_ALLOW_METHODS: f"{method}, OPTIONS",
            hdrs.ACCESS_CONTROL_ALLOW_HEADERS: ALLOWED_REQUEST_HEADERS,
            hdrs.ACCESS_CONTROL_MAX_AGE: _PREFLIGHT_MAX_AGE_S,
        },
    )


async def _response_headers(request: web.Request, response: web.StreamResponse) -> None:
    """On every response, errors and streams included: the request id and CORS headers, and a
    `Server` header that names no software version (edge.http.protocol sets it on the rest)."""
    response.headers[hdrs.SERVER] = SERVER_NAME
    ex: Exchange | None = request.get(EXCHANGE)
    if ex is not None:
        response.headers["X-Request-Id"] = ex.id
        if ex.rate_headers:
            response.headers.update(ex.rate_headers)
    origin = request.headers.get(hdrs.ORIGIN)
    if origin and _origin_allowed(request, origin):
        response.headers[hdrs.ACCESS_CONTROL_ALLOW_ORIGIN] = origin
        response.headers[hdrs.ACCESS_CONTROL_EXPOSE_HEADERS] = EXPOSED_HEADERS
        response.headers.add(hdrs.VARY, "Origin")


def _origin_allowed(request: web.Request, origin: str) -> bool:
    """The edge's CORS origins, plus the feature's own on a feature route."""
    if origin in request.app[SETTINGS].cors_origins:
        return True
    feature = request.get(features.FEATURE)
    return feature is not None and origin in feature.origins


async def healthz(request: web.Request) -> web.Response:
    """The process is alive and serving; says nothing about the agent."""
    return web.json_response({"status": "ok"})


async def readyz(request: web.Request) -> web.Response:
    """200 when requests can reach the model server now, else the error a request would get."""
    monitor = request.app[UPSTREAM]
    if monitor.status.state is State.UNKNOWN:
        await monitor.probe(request.app[SESSION])
    unready = monitor.unready()
    if unready is not None:
        raise unready
    status = monitor.status
    return web.json_response(
        {
            "status": "ready",
            "upstream": status.state.value,
            "reason": status.reason,
            "agent_present": status.agent_present,
        }
    )
