"""The edge's 503s as a client meets them, checked alike by every test that provokes one.

Each says what the client sees: the status, the error `type` in the route's own shape, and what
tells it when to come back (`Retry-After`) or that it waited for nothing (an answer at once).
The telemetry line of the request is the test's to check where it says more than its `type`.
"""

from __future__ import annotations

import time

import aiohttp

from tests.support.servers import Edge
from tests.support.sshd import GEN

# Seconds within which "at once" holds: the edge knows the agent is gone, so it waits out no
# connect and no timeout.
AT_ONCE_S = 0.5


async def assert_agent_unavailable_at_once(
    http: aiohttp.ClientSession, e: Edge, request_id: str
) -> None:
    """A generate request now is 503 `agent_unavailable` within `AT_ONCE_S`, and its telemetry
    line says so."""
    start = time.monotonic()
    headers = {"X-Request-Id": request_id}
    async with http.post(f"{e.url}/api/generate", json=GEN, headers=headers) as r:
        assert r.status == 503
        assert (await r.json())["type"] == "agent_unavailable"
    assert time.monotonic() - start < AT_ONCE_S
    assert (await e.record(request_id))["type"] == "agent_unavailable"


async def assert_overloaded(http: aiohttp.ClientSession, e: Edge, request_id: str) -> None:
    """An OpenAI-style request now is 503 `overloaded` in the OpenAI error shape, with the
    `Retry-After` that tells a client's SDK when to try again."""
    async with http.post(
        f"{e.url}/v1/completions",
        json={"model": "llama3.2:1b", "prompt": "x"},
        headers={"X-Request-Id": request_id},
    ) as r:
        assert r.status == 503
        assert r.headers["Retry-After"] == "5"
        assert (await r.json())["error"]["type"] == "overloaded"
