"""One request's context as it crosses the edge: its id, client, timing and telemetry record.

The outermost middleware (`edge.app`) creates the `Exchange`, every later step fills in the
record, and the middleware writes it once, whatever happened.
"""

from __future__ import annotations

import os
import random
import re
import time
from dataclasses import dataclass, field

from aiohttp import web

from edge.policy.keys import ApiKey
from edge.record import RequestRecord
from edge.routes import Route

_REQUEST_ID = re.compile(r"[A-Za-z0-9._:-]{1,128}")
# Request ids must be unique, not secret (the caller sees its own, and nothing is authorised by
# one): 128 bits of a generator seeded once from the OS, without a system call per request as
# `secrets` makes, and without a counter, which would tell callers how busy the edge is.
_IDS = random.Random(os.urandom(32))  # noqa: S311 - unique, not secret (above)


@dataclass(slots=True)
class Exchange:
    path: str  # the raw path, as the client wrote it
    record: RequestRecord  # carries the request id, `record.id`
    start: float = field(default_factory=time.perf_counter)
    route: Route | None = None
    headers_sent: bool = False
    upstream_s: float = 0.0  # seconds spent waiting on the upstream, for overhead_ms
    key: ApiKey | None = None  # the caller's API key once authenticated (edge.policy.guard)
    rate_headers: dict[str, str] | None = None  # RateLimit-* for the response (edge.policy.guard)
    via_proxy: bool = False  # the peer is a trusted proxy: it is not the client (ClientAddress)
    # Counted in an aggregate instead of a telemetry line (edge.policy.guard).
    aggregated: bool = False
    # The conversation it continues, for the pool's prompt-cache affinity (edge.upstreams.affinity).
    conversation: str | None = None

    @property
    def id(self) -> str:
        return self.record.id

    def elapsed_ms(self) -> float:
        return (time.perf_counter() - self.start) * 1000.0

    def overhead_ms(self) -> float:
        """Time the edge itself spent: everything but the wait on the upstream."""
        return max(0.0, self.elapsed_ms() - self.upstream_s * 1000.0)


EXCHANGE = web.RequestKey("exchange", Exchange)


def request_id(supplied: str | None) -> str:
    """The caller's `X-Request-Id` when it is a sane token, else a new one."""
    if supplied and _REQUEST_ID.fullmatch(supplied):
        return supplied
    return f"{_IDS.getrandbits(128):032x}"
