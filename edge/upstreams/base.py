"""What every upstream is described by: its state, and the one table that reads a failure.

`classify()` is the only place an aiohttp client failure becomes an upstream `State`: the
liveness probe (`edge.upstreams.monitor`) and the request path (`edge.upstreams.agent`) both
use it, so they cannot disagree about what a refused or silent connection means (they did: a
connect timeout was "agent absent" to requests and "tunnel silent" to the probe). As httpx's
`map_httpcore_exceptions` and the agent's `classify()`, it re-raises nothing and knows only the
exceptions it names; the caller decides what a state means for its answer.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

import aiohttp


class State(enum.Enum):
    UNKNOWN = "unknown"
    UP = "up"
    AGENT_ABSENT = "agent_absent"  # nothing listens on the tunnel's loopback port
    TUNNEL_SILENT = "tunnel_silent"  # it accepts but never answers: a half-open tunnel
    MODEL_SERVER_DOWN = "model_server_down"  # the agent answers, its model server does not
    # It answers 401/403: it wants an API key, and the edge's (upstream_api_key_file) is
    # missing or not the one it was started with.
    MODEL_SERVER_REFUSES = "model_server_refuses"


@dataclass(frozen=True, slots=True)
class Status:
    state: State
    reason: str
    since: float  # time.time() of the last change
    agent_present: bool | None  # from the embedded SSH server; None = not known (sshd mode)


# What a model server answers when it refuses the caller's credential.
REFUSED_STATUSES = frozenset({401, 403})


def classify_answer(status: int) -> State:
    """The upstream state an answer's status shows: a refused credential, a failing server
    (5xx), or one that is up (anything else, a 404 included: an OpenAI-only server has no
    `/api/version`)."""
    if status in REFUSED_STATUSES:
        return State.MODEL_SERVER_REFUSES
    if status >= 500:
        return State.MODEL_SERVER_DOWN
    return State.UP


def classify(exc: BaseException) -> tuple[State, str] | None:
    """The upstream state a failure talking to it shows, with a reason; None when it shows none.

    - connect refused (`ClientConnectorError`): nothing listens on the tunnel's loopback end, so
      the agent is absent;
    - a connect or read that timed out: something accepted (the SSH server's listener) and
      nothing came back, which is a half-open tunnel (a connect to a loopback port that times
      out means a listener that no longer accepts);
    - any other client error (a reset, EOF before the status line): the agent accepted and its
      model server failed.
    """
    if isinstance(exc, aiohttp.ClientConnectorError):
        return State.AGENT_ABSENT, f"connect refused: {exc.os_error}"
    if isinstance(exc, TimeoutError):  # aiohttp's ConnectionTimeoutError is one too
        return State.TUNNEL_SILENT, "no answer in time"
    if isinstance(exc, aiohttp.ClientError):
        return State.MODEL_SERVER_DOWN, f"failed: {exc!r}"
    return None
