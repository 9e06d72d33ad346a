"""`GET /v1/models/{id}`: one model of the filtered `/v1/models` list (the openai SDK's
`models.retrieve`), or 404 `not_found`.

The edge answers it from the list it already filters (by the model allowlist and the key's own
models) instead of relaying the path: the client's id never becomes part of an upstream path,
and the answer is the same on every model server (llama.cpp has no such route).
"""

from __future__ import annotations

from typing import Any
from urllib.parse import unquote

import orjson
from aiohttp import web

from edge.errors import NotFound
from edge.exchange import EXCHANGE, Exchange
from edge.models import canonical_model
from edge.proxy import handler
from edge.routes import BY_PATH, MODEL_PREFIX
from edge.services import EDGE

LIST = BY_PATH["/v1/models"]


async def retrieve_model(request: web.Request) -> web.StreamResponse:
    ex: Exchange = request[EXCHANGE]
    model = unquote(ex.path[len(MODEL_PREFIX) :])
    ex.route = LIST
    ex.record.model = model[:256]
    response = await handler.forward(request, request.app[EDGE], ex, LIST, None)
    if not isinstance(response, web.Response) or response.status != 200:
        return response
    assert isinstance(response.body, bytes)
    entry = _entry(orjson.loads(response.body), model)
    if entry is None:
        raise NotFound(f"no model '{model[:128]}' is served here (GET /v1/models lists them)")
    response.body = orjson.dumps(entry)
    ex.record.bytes_out = len(response.body)
    return response


def _entry(listing: Any, model: str) -> dict[str, Any] | None:
    """The `data` entry whose id names `model` as Ollama reads names, or None."""
    data = listing.get("data") if isinstance(listing, dict) else None
    if not isinstance(data, list):
        return None
    wanted = canonical_model(model)
    for item in data:
        if not isinstance(item, dict):
            continue
        name = item.get("id")
        if isinstance(name, str) and (name == model or canonical_model(name) == wanted):
            entry: dict[str, Any] = item
            return entry
    return None
