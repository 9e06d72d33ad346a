"""`GET /demo`: the browser demo page, when `BACKHAUL_EDGE_DEMO_PAGE=true`.

The page is one static file, `edge/http/demo.html`, shipped in the package; `docs/demo.html`
links to it, for website developers to copy. Served by the edge it
calls the edge on its own origin, so it works without any CORS setting; copied to another site
it needs that site's origin in `BACKHAUL_EDGE_CORS_ORIGINS`.
"""

from __future__ import annotations

from functools import cache
from importlib.resources import files

from aiohttp import hdrs, web

PAGE = files("edge.http").joinpath("demo.html")

# The page is all inline (so it can be copied as one file) and talks to whatever base URL its
# user types; nothing else is allowed: no framing, no other scripts, no referrer.
_HEADERS = {
    hdrs.CONTENT_TYPE: "text/html; charset=utf-8",
    hdrs.CACHE_CONTROL: "no-cache",
    "Content-Security-Policy": (
        "default-src 'none'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; "
        "connect-src *; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
    ),
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
}


@cache
def _body() -> bytes:
    return PAGE.read_bytes()  # once, at the first request


async def page(request: web.Request) -> web.Response:
    """`GET /demo`, routed only when the settings turn the page on (`edge.app`)."""
    return web.Response(body=_body(), headers=_HEADERS)
