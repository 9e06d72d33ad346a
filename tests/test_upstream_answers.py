"""An upstream that answers 200 with something other than JSON on a route the edge must read."""

from __future__ import annotations

from pathlib import Path

import aiohttp
from aiohttp import web

from tests.support.servers import edge, serving


async def test_non_json_model_list_is_a_clear_502(tmp_path: Path, http: aiohttp.ClientSession):
    async def version(request: web.Request) -> web.Response:
        return web.json_response({"version": "0.12.6"})

    async def garbage(request: web.Request) -> web.Response:
        return web.Response(text="<html>a captive portal</html>", content_type="text/html")

    app = web.Application()
    app.router.add_get("/api/version", version)
    app.router.add_get("/api/tags", garbage)
    app.router.add_post("/api/show", garbage)
    async with serving(app) as url, edge(url, tmp_path) as e:
        async with http.get(f"{e.url}/api/tags", headers={"X-Request-Id": "tags"}) as r:
            assert r.status == 502
            assert await r.json() == {
                "error": "the model server's answer is not JSON",
                "type": "upstream_unavailable",
                "request_id": "tags",
            }
        async with http.post(f"{e.url}/api/show", json={"model": "llama3.2:1b"}) as r:
            assert r.status == 502
            assert (await r.json())["type"] == "upstream_unavailable"
        assert (await e.record("tags"))["status"] == 502
