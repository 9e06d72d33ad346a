"""The edge behind a real nginx and a real Caddy, each set up as docs/deploy.md section 4 says.

What the recipes promise, checked through both over TLS (tests/support/proxies.py reads the
recipes from the docs and says what differs from them): the edge records the address the proxy
saw, never one the client wrote; 10 bad keys ban the guesser, not everyone behind the proxy;
`/metrics` through the proxy needs the token; a stream reaches the client as it is made.

The proxies reach the edge from 127.0.0.1, its one trusted proxy. Clients connect to the proxy
from 127.0.0.1 (the case a proxy that appends to `X-Forwarded-For` gets wrong: the edge skips
trusted hops, so the client's own forged entry would be taken) and from 127.0.0.2 and .3 (two
clients that are not the proxy's address). nginx drops the client's header because the recipe
sets its own; Caddy (2.5 and later: Debian 12 has 2.6.2) does so unasked, as long as its
`reverse_proxy` has no `trusted_proxies`.
"""

from __future__ import annotations

from pathlib import Path

import orjson
import pytest

from tests.support.keyfiles import bearer, keyed, write_keys
from tests.support.proxies import requires, running_proxy
from tests.support.servers import edge, simulator

PROXIES = [
    pytest.param(kind, marks=[pytest.mark.proxies, requires(kind)]) for kind in ("nginx", "caddy")
]
GEN = {"model": "llama3.2:1b", "prompt": "why", "stream": False}
TRUSTED = {"trusted_proxies": ["127.0.0.1/32"]}
GUESSER, OTHER = "127.0.0.2", "127.0.0.3"
# What a client may write, one header or two (the proxy must drop them all): with the proxy
# appending its view instead, the edge would take 203.0.113.9 from a client on 127.0.0.1.
FORGED = [
    [("X-Forwarded-For", "203.0.113.9")],
    [("X-Forwarded-For", "198.51.100.7"), ("x-forwarded-for", "203.0.113.9")],
]
TOKEN = "metrics-token-0123456789abcdef0123"


@pytest.mark.parametrize("kind", PROXIES)
async def test_the_edge_records_the_address_the_proxy_saw(tmp_path: Path, kind: str):
    async with (
        simulator() as sim,
        edge(sim.url, tmp_path, **TRUSTED) as e,
        running_proxy(kind, tmp_path / kind, e.url) as proxy,
    ):
        for source in ("127.0.0.1", GUESSER):
            async with proxy.client(source) as http:
                for i, forged in enumerate([[], *FORGED]):
                    rid = f"{source}-{i}"
                    headers = [*forged, ("X-Request-Id", rid)]
                    async with http.post(
                        f"{proxy.url}/api/generate", json=GEN, headers=headers
                    ) as r:
                        assert r.status == 200, await r.text()
                    assert (await e.record(rid))["client"] == source
        assert len(await e.records()) == 6


@pytest.mark.parametrize("kind", PROXIES)
async def test_bad_keys_ban_the_guesser_not_the_proxy(tmp_path: Path, kind: str):
    secrets = write_keys(tmp_path / "keys.json", real={})
    async with (
        simulator() as sim,
        edge(sim.url, tmp_path, **keyed(tmp_path, **TRUSTED)) as e,
        running_proxy(kind, tmp_path / kind, e.url) as proxy,
        proxy.client(GUESSER) as guesser,
        proxy.client(OTHER) as other,
    ):
        url = f"{proxy.url}/api/generate"
        # The default threshold, 10 guesses; a new forged address on each does not help.
        for i in range(10):
            headers = {**bearer(f"bh_{i:043d}"), "X-Forwarded-For": f"203.0.113.{i}"}
            async with guesser.post(url, json=GEN, headers=headers) as r:
                assert r.status == 401
                assert (await r.json())["type"] == "unauthorized"
        async with guesser.post(url, json=GEN, headers=bearer(secrets["real"])) as r:
            assert r.status == 403
            assert (await r.json())["type"] == "banned"
        async with other.post(url, json=GEN, headers=bearer(secrets["real"])) as r:
            assert r.status == 200
        bans = e.edge.guard.bans
        assert len(bans) == 1 and bans.banned_for(GUESSER) is not None
        assert {r["client"] for r in await e.records()} == {GUESSER, OTHER}


@pytest.mark.parametrize("kind", PROXIES)
async def test_metrics_through_the_proxy_need_the_token(tmp_path: Path, kind: str):
    async with (
        simulator() as sim,
        edge(sim.url, tmp_path, metrics_token=TOKEN, **TRUSTED) as e,
        running_proxy(kind, tmp_path / kind, e.url) as proxy,
        proxy.client("127.0.0.1") as http,  # from the proxy's own host: still not local
    ):
        for headers in ({}, {"X-Forwarded-For": "127.0.0.1"}):
            async with http.get(f"{proxy.url}/metrics", headers=headers) as r:
                assert r.status == 403
                assert (await r.json())["error"]["type"] == "forbidden"
        async with http.get(f"{proxy.url}/metrics", headers=bearer(TOKEN)) as r:
            assert r.status == 200
            assert "backhaul_requests_total" in await r.text()


@pytest.mark.parametrize("kind", PROXIES)
async def test_a_stream_reaches_the_client_as_it_is_made(tmp_path: Path, kind: str):
    """A proxy that buffered would hand over the first line only once the model had finished:
    20 tokens at 20 a second give the first line a second's head start. This checks the outcome,
    not one line of a recipe: the edge's `X-Accel-Buffering: no` alone turns nginx's buffering
    off for the answer, and Caddy 2.6 writes an answer without a length at once whatever its
    `flush_interval` (nginx told to ignore that header, with `proxy_buffering on`, fails here)."""
    async with (
        simulator(tok_per_s=20, reply_tokens=20) as sim,
        edge(sim.url, tmp_path, **TRUSTED) as e,
        running_proxy(kind, tmp_path / kind, e.url) as proxy,
        proxy.client(GUESSER) as http,
        http.post(f"{proxy.url}/api/generate", json={**GEN, "stream": True}) as r,
    ):
        assert r.status == 200
        first = orjson.loads(await r.content.readline())
        assert not first["done"]
        assert sim.stats.generating == 1, "the first token arrived after the model finished"
        rest = [orjson.loads(line) async for line in r.content if line.strip()]
        assert rest[-1]["done"] and len(rest) >= 20
