"""Every route the edge answers: the allowlist it proxies, its own routes, the feature prefix.

The allowlist is the only paths the edge proxies, and what each one is (DESIGN.md §4).

A request is proxied only when its raw path (before any decoding or normalisation) equals one of
these paths exactly, and the upstream is always sent the canonical path from this table, never
the client's spelling. So `/api/../api/pull`, `/api/%2e%2e/api/pull`, `//api/pull`,
`/API/PULL` and `/api/pull/` are all 404 and nothing the client writes can name an admin route
(`pull`, `push`, `create`, `copy`, `delete`, `blobs`: the CVE path) on the model server.
"""

from __future__ import annotations

import enum
import re
from dataclasses import dataclass


class Kind(enum.Enum):
    """What the edge does with a route's body and response."""

    GENERATE = "generate"  # inference with output: sanitise, cap output, figures
    EMBED = "embed"  # inference without generated tokens: sanitise, model check
    LIST = "list"  # model list: filtered to the allowed models
    SHOW = "show"  # model details: model check, prompts and templates removed
    META = "meta"  # version: passed through as is


@dataclass(frozen=True, slots=True)
class Route:
    method: str
    path: str
    kind: Kind
    openai: bool  # OpenAI wire format (errors, usage, SSE) rather than Ollama's

    @property
    def has_body(self) -> bool:
        return self.method == "POST"


ROUTES: tuple[Route, ...] = (
    Route("POST", "/api/generate", Kind.GENERATE, openai=False),
    Route("POST", "/api/chat", Kind.GENERATE, openai=False),
    Route("POST", "/api/embed", Kind.EMBED, openai=False),
    Route("POST", "/api/embeddings", Kind.EMBED, openai=False),
    Route("GET", "/api/tags", Kind.LIST, openai=False),
    Route("POST", "/api/show", Kind.SHOW, openai=False),
    Route("GET", "/api/version", Kind.META, openai=False),
    Route("GET", "/api/ps", Kind.LIST, openai=False),
    Route("POST", "/v1/chat/completions", Kind.GENERATE, openai=True),
    Route("POST", "/v1/completions", Kind.GENERATE, openai=True),
    Route("POST", "/v1/embeddings", Kind.EMBED, openai=True),
    Route("GET", "/v1/models", Kind.LIST, openai=True),
)

# The same routes without `/v1`, as clients configured with a bare base URL call them (LiteLLM's
# `openai/` provider with `api_base=https://host`): the same route, the same limits; the
# upstream is always sent the canonical `/v1` path.
ALIASES: dict[str, str] = {
    "/chat/completions": "/v1/chat/completions",
    "/completions": "/v1/completions",
    "/embeddings": "/v1/embeddings",
    "/models": "/v1/models",
}
BY_PATH: dict[str, Route] = {route.path: route for route in ROUTES}
BY_PATH.update({alias: BY_PATH[path] for alias, path in ALIASES.items()})
# `GET /v1/models/{id}` (the openai SDK's `models.retrieve`): answered by the edge from the
# filtered `/v1/models` list, so it holds on every server and never builds an upstream path from
# what the client wrote.
MODEL_PREFIX = "/v1/models/"
# A path reaches routing only if it is plain: no encoding, no empty, `.` or `..` segment, no
# trailing slash. Anything else is 404 before routing.
_PLAIN_PATH = re.compile(r"(/[A-Za-z0-9_\-]+(\.[A-Za-z0-9_\-]+)*)+")


def routable(raw: str, decoded: str) -> bool:
    """Whether a request's raw path (as the client wrote it; `decoded` as aiohttp read it) may
    reach routing: a plain path, `/`, or a model id under `MODEL_PREFIX`, whose id is only ever
    looked up in a list, never sent upstream."""
    if raw.startswith(MODEL_PREFIX):
        return len(raw) > len(MODEL_PREFIX)
    return raw == "/" or (_PLAIN_PATH.fullmatch(raw) is not None and decoded == raw)


# Routes real clients call that the edge does not serve, with what to use instead: a clear 404.
UNSERVED: dict[str, str] = {
    "/v1/responses": (
        "the Responses API (/v1/responses) is not served here; use /v1/chat/completions"
    ),
    "/v1/messages": (
        "the Anthropic Messages API (/v1/messages) is not served here; use /v1/chat/completions"
    ),
}


@dataclass(frozen=True, slots=True)
class OwnRoute:
    """A route the edge answers itself."""

    path: str
    open: bool  # answered without an API key (it has its own rule, or none)
    logged: bool  # a telemetry line per request (probes and scrapes would flood the log)


OWN_ROUTES: tuple[OwnRoute, ...] = (
    # Ollama's own "Ollama is running", which tools call to check the server is there.
    OwnRoute("/", open=True, logged=False),
    OwnRoute("/healthz", open=True, logged=False),
    OwnRoute("/readyz", open=True, logged=False),
    OwnRoute("/metrics", open=True, logged=False),  # its own token (edge.metrics)
    OwnRoute("/agents", open=True, logged=False),  # the metrics token, as /metrics
    OwnRoute("/demo", open=True, logged=True),
)
OWN_PATHS = frozenset(route.path for route in OWN_ROUTES)
OPEN_PATHS = frozenset(route.path for route in OWN_ROUTES if route.open)
UNLOGGED_PATHS = frozenset(route.path for route in OWN_ROUTES if not route.logged)
# Feature endpoints, `POST /features/NAME` (edge.proxy.features).
FEATURE_PREFIX = "/features/"
