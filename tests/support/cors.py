"""A browser's preflight, as it asks before a cross-origin JSON POST, and the edge's two answers
that every CORS-enabled route owes it: allowed for a listed origin, refused for any other."""

from __future__ import annotations

from collections.abc import Mapping

import aiohttp

UNLISTED = "https://evil.example"


async def assert_preflight(http: aiohttp.ClientSession, url: str, origin: str) -> Mapping[str, str]:
    """The preflight for a JSON POST to `url` from `origin` is 204 and allows that origin, POST
    and Content-Type; from an `UNLISTED` origin it is 403 and allows nothing. Returns the allowed
    answer's headers, for what a route adds."""
    preflight = {
        "Origin": origin,
        "Access-Control-Request-Method": "POST",
        "Access-Control-Request-Headers": "content-type",
    }
    async with http.options(url, headers=preflight) as r:
        assert r.status == 204
        assert r.headers["Access-Control-Allow-Origin"] == origin
        assert "POST" in r.headers["Access-Control-Allow-Methods"]
        assert "Content-Type" in r.headers["Access-Control-Allow-Headers"]
        allowed = r.headers
    async with http.options(url, headers={**preflight, "Origin": UNLISTED}) as r:
        assert r.status == 403
        assert "Access-Control-Allow-Origin" not in r.headers
    return allowed
