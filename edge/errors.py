"""Every error the edge answers with, as data: an HTTP status and a stable `type`.

```
shared.errors.BackhaulError
└── EdgeError                       status, type, message, headers
    ├── InvalidRequest      400 invalid_request
    ├── BadHttpRequest      400 bad_http_request  (not valid HTTP: answered by edge.http.protocol)
    ├── UnknownClient       400 unknown_client   (a trusted proxy did not name the client)
    ├── Unauthorized        401 unauthorized
    ├── Forbidden           403 forbidden        (model or route not allowed)
    ├── Banned              403 banned           + Retry-After (too many failed authentications)
    ├── NotFound            404 not_found        (every route not on the allowlist)
    ├── NotSupported        404 not_supported    (an Ollama route on an OpenAI-only server)
    ├── MethodNotAllowed    405 method_not_allowed
    ├── RequestTimeout      408 request_timeout   (the body did not arrive within body_timeout)
    ├── PayloadTooLarge     413 payload_too_large
    ├── UnsupportedMediaType 415 unsupported_media_type (a compressed request body)
    ├── RateLimited         429 rate_limited      + Retry-After
    ├── BudgetExhausted     429 budget_exhausted  + Retry-After (the key's day or month is spent)
    ├── InternalError       500 internal_error    (a bug: logged with its traceback, never sent)
    ├── UpstreamFailed      5xx upstream_error    (the model server's own 5xx, its body kept back)
    ├── UpstreamUnavailable 502 upstream_unavailable (agent up, model server down)
    ├── UpstreamRefused     502 upstream_refused  (the model server refuses the edge's credential)
    ├── InvalidModelOutput  502 invalid_model_output (a feature's answer broke its JSON schema)
    ├── AgentUnavailable    503 agent_unavailable + Retry-After (no tunnel, or a silent one)
    ├── UpstreamBusy        503 upstream_busy     + Retry-After (the model server's queue is full)
    ├── Overloaded          503 overloaded        + Retry-After (our GPU gate is full)
    └── UpstreamTimeout     504 upstream_timeout  (no response headers within the read timeout)
```

One middleware (`edge.app`) renders them in the shape the route's clients parse (`render`); the
`type` strings are an API: operators and clients match on them, so they never change.
"""

from __future__ import annotations

from collections.abc import Mapping

import orjson
from aiohttp import web

from shared.errors import BackhaulError


class EdgeError(BackhaulError):
    """An error with an HTTP status; the message is safe to show to the client."""

    status = 500
    type = "internal_error"

    def __init__(self, message: str, *, headers: Mapping[str, str] | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.headers = dict(headers or {})


class InvalidRequest(EdgeError):
    status, type = 400, "invalid_request"


class UnknownClient(EdgeError):
    status, type = 400, "unknown_client"


class BadHttpRequest(EdgeError):
    status, type = 400, "bad_http_request"


class Unauthorized(EdgeError):
    status, type = 401, "unauthorized"


class Forbidden(EdgeError):
    status, type = 403, "forbidden"


class Banned(EdgeError):
    status, type = 403, "banned"


class NotFound(EdgeError):
    status, type = 404, "not_found"


class ModelNotFound(EdgeError):
    """No workstation in the pool has the model the request names."""

    status, type = 404, "model_not_found"


class NotSupported(EdgeError):
    """An allowlisted Ollama route the model server does not serve: llama.cpp and vLLM speak
    only OpenAI's API (the message names the `/v1` route to use instead)."""

    status, type = 404, "not_supported"


class MethodNotAllowed(EdgeError):
    status, type = 405, "method_not_allowed"


class RequestTimeout(EdgeError):
    status, type = 408, "request_timeout"


class PayloadTooLarge(EdgeError):
    status, type = 413, "payload_too_large"


class UnsupportedMediaType(EdgeError):
    status, type = 415, "unsupported_media_type"


class RateLimited(EdgeError):
    status, type = 429, "rate_limited"


class BudgetExhausted(EdgeError):
    """The key spent its token budget for the day or month; `Retry-After` runs to the reset."""

    status, type = 429, "budget_exhausted"


class InternalError(EdgeError):
    status, type = 500, "internal_error"


class UpstreamFailed(EdgeError):
    """The model server answered a 5xx (other than 503): its status, with the edge's message.

    Its body stays in the operator's log (`upstream.failed`): a model server's error text can
    name workstation paths, its libraries and versions.
    """

    type = "upstream_error"

    def __init__(self, status: int) -> None:
        super().__init__(
            f"the model server failed the request (status {status}); "
            "the operator's log has its message under this request id"
        )
        self.status = status


class UpstreamUnavailable(EdgeError):
    status, type = 502, "upstream_unavailable"


class UpstreamRefused(EdgeError):
    """The model server answered 401 or 403: it refuses the edge's own credential (none, or
    not its `--api-key`). Never the caller's key, which is never sent upstream, so never a 401
    to the caller, who can do nothing about it."""

    status, type = 502, "upstream_refused"


class InvalidModelOutput(EdgeError):
    status, type = 502, "invalid_model_output"


class AgentUnavailable(EdgeError):
    status, type = 503, "agent_unavailable"


class ConnectionLost(AgentUnavailable):
    """The agent's connection went while a request waited for its answer (a reconnect replaced
    it, or its tunnel went silent): nothing timed out, and the pool may send it again."""


class UpstreamBusy(EdgeError):
    status, type = 503, "upstream_busy"


class Overloaded(EdgeError):
    status, type = 503, "overloaded"


class UpstreamTimeout(EdgeError):
    status, type = 504, "upstream_timeout"


def error_body(path: str, err: EdgeError, request_id: str) -> bytes:
    """The JSON body for `err` in the shape the clients of `path` parse (DESIGN.md §4).

    `/api/*` speaks Ollama (`{"error": "message"}`, which the ollama SDK raises as
    `ResponseError`), with `type` beside it; everything else speaks OpenAI
    (`{"error": {"message", "type", "code"}}`, which the openai SDK parses into `APIError`).
    """
    if path.startswith("/api/"):
        return orjson.dumps({"error": err.message, "type": err.type, "request_id": request_id})
    return orjson.dumps(
        {
            "error": {
                "message": err.message,
                "type": err.type,
                "code": err.type,
                "param": None,
                "request_id": request_id,
            }
        }
    )


def render(path: str, err: EdgeError, request_id: str) -> web.Response:
    """The complete error response; headers such as `Retry-After` come from the error."""
    response = web.Response(
        status=err.status,
        body=error_body(path, err, request_id),
        content_type="application/json",
        headers=err.headers,
    )
    return response
