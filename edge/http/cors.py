"""CORS: which browser origins may call the edge, its preflight answers and response headers.

A web page on an allowed origin (`cors_origins`, plus a feature's own) may call the edge and
read the figures it adds (`EXPOSED_HEADERS`); every other origin's preflight is 403.
"""

from __future__ import annotations

from aiohttp import hdrs, web

from edge.errors import Forbidden, NotFound
from edge.exchange import EXCHANGE, Exchange
from edge.http.protocol import SERVER_NAME
from edge.proxy.features import FEATURE, Feature
from edge.routes import BY_PATH
from edge.services import EDGE

# Headers a browser on another origin may read (CORS hides every other one).
EXPOSED_HEADERS = ", ".join(
    (
        "X-Tok-Per-S",
        "X-Gen-Time",
        "X-Tokens",
        "X-Request-Id",
        "X-Edge-Overhead-Ms",
        "X-Backhaul-Served-By",
        "Retry-After",
        "RateLimit-Limit",
        "RateLimit-Remaining",
        "RateLimit-Reset",
    )
)
ALLOWED_REQUEST_HEADERS = "Authorization, Content-Type, X-Request-Id"
# Seconds a browser may cache a preflight answer.
_PREFLIGHT_MAX_AGE_S = "600"


def preflight(request: web.Request, path: str, feature: Feature | None) -> web.Response:
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


async def response_headers(request: web.Request, response: web.StreamResponse) -> None:
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
    if origin in request.app[EDGE].settings.cors_origins:
        return True
    feature = request.get(FEATURE)
    return feature is not None and origin in feature.origins
