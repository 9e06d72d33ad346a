"""`create_app(edge)`: the edge's aiohttp application, shared by production and the tests.

It owns nothing long-lived: `edge.services.open_edge()` built every object the handlers use, and
the application holds that one `Edge` under `EDGE`. Here are only the routes (the allowlist,
the edge's own, the features') and the middleware (`edge.http.middleware`).
"""

from __future__ import annotations

from aiohttp import web

from edge.http import cors, demo, probes
from edge.http.middleware import exchange_middleware
from edge.proxy import feature_route, handler, model_route
from edge.routes import ALIASES, BY_PATH, FEATURE_PREFIX, MODEL_PREFIX, ROUTES
from edge.services import EDGE, Edge


def create_app(edge: Edge) -> web.Application:
    """Build the edge application around `edge`; run it with `handler_cancellation=True`."""
    settings = edge.settings
    app = web.Application(
        middlewares=[exchange_middleware],
        client_max_size=settings.max_body_bytes,
        # keepalive_timeout is also the deadline for a request's headers (slowloris): aiohttp
        # closes a connection that has not sent a complete header block by then.
        handler_args={
            "max_field_size": 16 * 1024,
            "keepalive_timeout": settings.keepalive_timeout,
            # Never inflate a request body: a 255 KB gzip bomb would cost 157 MiB before the
            # size check; a Content-Encoding is refused 415 instead (edge.http.middleware).
            "auto_decompress": False,
        },
    )
    app[EDGE] = edge
    for route in ROUTES:
        app.router.add_route(route.method, route.path, handler.proxy)
    for alias, path in ALIASES.items():
        app.router.add_route(BY_PATH[path].method, alias, handler.proxy)
    app.router.add_get(MODEL_PREFIX + "{model:.+}", model_route.retrieve_model)
    app.router.add_get("/", probes.root, allow_head=True)
    app.router.add_get("/healthz", probes.healthz, allow_head=True)
    app.router.add_get("/readyz", probes.readyz, allow_head=True)
    app.router.add_get("/metrics", probes.metrics)
    app.router.add_get("/agents", probes.agents)
    app.router.add_post(FEATURE_PREFIX + "{name}", feature_route.handle)
    if settings.demo_page:
        app.router.add_get("/demo", demo.page)
    app.on_response_prepare.append(cors.response_headers)
    return app
