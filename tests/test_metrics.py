"""`/metrics`: parsed back with prometheus-client's own parser and checked against what was sent."""

from __future__ import annotations

import asyncio
import re
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import pytest
from prometheus_client.parser import text_string_to_metric_families
from pydantic import SecretStr

from edge.metrics import OTHER, Scrape, scrape_access
from edge.record import RequestRecord
from edge.settings import EdgeSettings
from shared.errors import ConfigError
from tests.support.keyfiles import captured_logs
from tests.support.metrics import scrape, value
from tests.support.servers import edge, simulator

ROOT = Path(__file__).resolve().parent.parent
GEN = {"model": "llama3.2:1b", "prompt": "why is the sky blue", "stream": False}
TOKEN = "metrics-token-0123456789abcdef0123"  # the 32 characters at least the edge takes


async def test_counters_match_the_requests_made(tmp_path: Path, http: aiohttp.ClientSession):
    async with simulator(reply_tokens=9) as sim, edge(sim.url, tmp_path) as e:
        for _ in range(3):
            async with http.post(f"{e.url}/api/generate", json=GEN) as r:
                assert r.status == 200
        chat = {"model": "llama3.2:1b", "messages": [{"role": "user", "content": "hi"}]}
        async with http.post(f"{e.url}/api/chat", json=chat) as r:
            assert r.status == 200
            await r.read()
        async with http.post(f"{e.url}/api/pull", json={"model": "x"}) as r:
            assert r.status == 404
        async with http.post(f"{e.url}/api/generate", data=b"{not json") as r:
            assert r.status == 400
        async with http.get(f"{e.url}/api/pul%6c") as r:
            assert r.status == 404
        records = await e.records()  # waits for the lines to be written
        m = await scrape(http, e.url)

    reqs = "backhaul_requests_total"
    assert value(m, reqs, route="/api/generate", status="200", model="llama3.2:1b", key="") == 3
    assert value(m, reqs, route="/api/chat", status="200", model="llama3.2:1b", key="") == 1
    assert value(m, reqs, route="/api/generate", status="400", model="", key="") == 1
    assert value(m, reqs, route=OTHER, status="404", model="", key="") == 2
    # Every logged request is counted once, and by the same status (the scrape is not logged).
    counted = {
        (dict(ls)["route"], dict(ls)["status"]): v
        for (n, ls), v in m.items()
        if n == reqs and dict(ls)["route"] != "/metrics"
    }
    assert sum(counted.values()) == len(records) == 7
    for status in {r["status"] for r in records}:
        logged = sum(1 for r in records if r["status"] == status)
        assert sum(v for (_, s), v in counted.items() if s == str(status)) == logged

    assert value(m, "backhaul_rejected_requests_total", reason="not_found") == 2
    assert value(m, "backhaul_rejected_requests_total", reason="invalid_request") == 1
    assert value(m, "backhaul_request_outcomes_total", outcome="ok") == 4
    assert value(m, "backhaul_request_outcomes_total", outcome="error") == 3
    duration = "backhaul_request_duration_seconds_count"
    assert value(m, duration, route="/api/generate") == 4
    assert value(m, duration, route="/api/chat") == 1
    assert value(m, "backhaul_upstream_ttfb_seconds_count", route="/api/generate") == 3
    assert value(m, "backhaul_queue_wait_seconds_count") == 4
    assert value(m, "backhaul_tokens_per_second_count", model="llama3.2:1b") == 4
    completion = value(m, "backhaul_tokens_total", kind="completion", model="llama3.2:1b", key="")
    assert completion == 4 * 9 == sum(r["tokens"] or 0 for r in records)
    prompt = value(m, "backhaul_tokens_total", kind="prompt", model="llama3.2:1b", key="")
    assert prompt == sum(r["prompt_tokens"] or 0 for r in records) > 0
    # Histogram buckets are cumulative and end at the count.
    assert (
        value(m, "backhaul_request_duration_seconds_bucket", route="/api/generate", le="+Inf") == 4
    )
    # Live state.
    assert value(m, "backhaul_agent_connected", agent="default") == 1
    assert value(m, "backhaul_upstream_state", agent="default", state="up") == 1
    assert value(m, "backhaul_upstream_state", agent="default", state="agent_absent") == 0
    assert value(m, "backhaul_inflight_requests") == 0
    assert value(m, "backhaul_gate_slots") == 2
    assert value(m, "backhaul_telemetry_lines_total", result="written") == 7


async def test_gauges_show_a_held_stream_and_a_queued_request(
    tmp_path: Path, http: aiohttp.ClientSession
):
    # 60 tokens at 30 tok/s: a 2 s stream, cut short by the test once it has been seen.
    async with (
        simulator(reply_tokens=60, tok_per_s=30) as sim,
        edge(sim.url, tmp_path, max_inflight=1) as e,
    ):
        gate = e.edge.pool.gate
        payload = {**GEN, "stream": True}
        async with http.post(f"{e.url}/api/generate", json=payload) as held:
            assert held.status == 200
            await held.content.readline()  # the first token: the slot is held
            second = asyncio.ensure_future(http.post(f"{e.url}/api/generate", json=GEN))
            try:
                async with asyncio.timeout(5):
                    await gate.wait_queued(1)
                m = await scrape(http, e.url)
                assert value(m, "backhaul_inflight_requests") == 1
                assert value(m, "backhaul_queued_requests") == 1
            finally:
                second.cancel()
                await asyncio.gather(second, return_exceptions=True)
        # The held stream was dropped by its client: the edge closed its upstream request and
        # gave the slot back in the same unwinding, before the simulator saw the close.
        async with asyncio.timeout(5):
            await sim.stats.wait_cancelled()
        assert gate.inflight == 0 and gate.queued == 0
        m = await scrape(http, e.url)
        assert value(m, "backhaul_inflight_requests") == 0
        assert value(m, "backhaul_queued_requests") == 0
        assert value(m, "backhaul_request_outcomes_total", outcome="client_gone") >= 1


async def test_agent_connects_and_upstream_state(tmp_path: Path, http: aiohttp.ClientSession):
    async with simulator() as sim, edge(sim.url, tmp_path) as e:
        monitor = e.agent.monitor
        await monitor.probe(e.edge.sessions.pooled)
        # What the embedded SSH server reports: the agent drops, then comes back twice.
        for present in (True, False, True, False, True):
            monitor.set_agent_present(present)
        m = await scrape(http, e.url)
        assert value(m, "backhaul_agent_connected", agent="default") == 1
        assert value(m, "backhaul_agent_reconnects_total", agent="default") == 2
        monitor.set_agent_present(False)
        m = await scrape(http, e.url)
        assert value(m, "backhaul_agent_connected", agent="default") == 0
        assert value(m, "backhaul_upstream_state", agent="default", state="agent_absent") == 1
        assert value(m, "backhaul_upstream_state", agent="default", state="up") == 0
        # A request refused while the agent is away is a rejection by reason.
        async with http.post(f"{e.url}/api/generate", json=GEN) as r:
            assert r.status == 503
        m = await scrape(http, e.url)
        assert value(m, "backhaul_rejected_requests_total", reason="agent_unavailable") == 1


async def test_token_lets_a_proxied_scraper_in(tmp_path: Path, http: aiohttp.ClientSession):
    async with simulator() as sim, edge(sim.url, tmp_path, metrics_token=TOKEN) as e:
        # Through a TLS proxy on the same machine the peer is loopback, but the request is not
        # local: without the token it is refused.
        proxied = {"X-Forwarded-For": "198.51.100.7"}
        async with http.get(f"{e.url}/metrics", headers=proxied) as r:
            assert r.status == 403
            body = orjson.loads(await r.read())
            assert body["error"]["type"] == "forbidden"
        bad = {**proxied, "Authorization": f"Bearer {TOKEN[:-1]}x"}
        async with http.get(f"{e.url}/metrics", headers=bad) as r:
            assert r.status == 403
        m = await scrape(http, e.url, Authorization=f"Bearer {TOKEN}", **proxied)
        refused = value(
            m, "backhaul_requests_total", route="/metrics", status="403", model="", key=""
        )
        assert refused == 2
        # A direct loopback scrape needs no token.
        await scrape(http, e.url)
        assert not (tmp_path / "telemetry.jsonl").exists()  # scrapes are not logged


async def test_a_trusted_proxy_is_never_a_local_scraper(
    tmp_path: Path, http: aiohttp.ClientSession
):
    """nginx adds no forwarding header unless told to: its requests come from loopback and
    look local. The peer being a trusted proxy is enough to need the token."""
    trusted = {"trusted_proxies": ["127.0.0.1/32"], "metrics_token": TOKEN}
    async with simulator() as sim, edge(sim.url, tmp_path, **trusted) as e:
        async with http.get(f"{e.url}/metrics") as r:
            assert r.status == 403
            assert (await r.json())["error"]["type"] == "forbidden"
        await scrape(http, e.url, Authorization=f"Bearer {TOKEN}")
    # Without a token configured, nothing that comes through the proxy is ever served.
    proxy_only = {"trusted_proxies": ["127.0.0.1/32"]}
    async with (
        simulator() as sim,
        edge(sim.url, tmp_path, **proxy_only) as e,
        http.get(f"{e.url}/metrics") as r,
    ):
        assert r.status == 403


async def test_metrics_token_guesses_ban_the_guesser(tmp_path: Path, http: aiohttp.ClientSession):
    trusted = {"trusted_proxies": ["127.0.0.1/32"], "metrics_token": TOKEN, "ban_threshold": 3}
    guesser = {"X-Forwarded-For": "198.51.100.7"}
    with captured_logs() as logs:
        async with simulator() as sim, edge(sim.url, tmp_path, **trusted) as e:
            for i in range(3):
                wrong = {**guesser, "Authorization": f"Bearer {TOKEN[:-2]}{i:02d}"}
                async with http.get(f"{e.url}/metrics", headers=wrong) as r:
                    assert r.status == 403
                    assert (await r.json())["error"]["type"] == "forbidden"
            # Banned now: the right token does not help that address...
            right = {**guesser, "Authorization": f"Bearer {TOKEN}"}
            async with http.get(f"{e.url}/metrics", headers=right) as r:
                assert r.status == 403
                assert (await r.json())["error"]["type"] == "banned"
                assert int(r.headers["Retry-After"]) > 0
            # ...but another client behind the same proxy is served.
            await scrape(
                http, e.url, Authorization=f"Bearer {TOKEN}", **{"X-Forwarded-For": "198.51.100.8"}
            )
    failed = [x for x in logs if x["event"] == "auth.failed"]
    assert [x["reason"] for x in failed] == ["metrics_token"] * 3
    assert {x["client"] for x in failed} == {"198.51.100.7"}
    assert TOKEN not in repr(logs) and TOKEN[:-2] not in repr(logs)


def test_a_short_metrics_token_is_refused_at_start():
    with pytest.raises(ConfigError, match="metrics_token must be at least 32 characters"):
        EdgeSettings.load(metrics_token="s3cret-token")
    assert EdgeSettings.load(metrics_token=TOKEN).metrics_token is not None


def test_access_decision():
    token = SecretStr(TOKEN)
    right, wrong = {"Authorization": f"Bearer {TOKEN}"}, {"Authorization": "Bearer wrong"}

    def access(peer: str | None, headers: dict[str, str], token: SecretStr | None = None,
               via_proxy: bool = False) -> Scrape:  # fmt: skip
        return scrape_access(peer, headers, token, via_proxy)

    assert access("127.0.0.1", {}) is Scrape.ALLOWED
    assert access("::1", {}) is Scrape.ALLOWED
    assert access("203.0.113.9", {}) is Scrape.REFUSED
    assert access("203.0.113.9", {}, token) is Scrape.REFUSED
    assert access("203.0.113.9", wrong, token) is Scrape.GUESS
    assert access("203.0.113.9", {"Authorization": f"Basic {TOKEN}"}, token) is Scrape.GUESS
    assert access("203.0.113.9", {"Authorization": f"Bearer {TOKEN[:-1]}"}, token) is Scrape.GUESS
    assert access("203.0.113.9", right, token) is Scrape.ALLOWED
    assert access("203.0.113.9", {"Authorization": f"bearer {TOKEN}"}, token) is Scrape.ALLOWED
    assert access("203.0.113.9", right) is Scrape.REFUSED  # no token configured: no guess
    assert access("127.0.0.1", {"Forwarded": "for=198.51.100.7"}) is Scrape.REFUSED
    assert access("127.0.0.1", {"X-Real-IP": "198.51.100.7"}) is Scrape.REFUSED
    # A trusted proxy's request carrying no forwarding header is still not local.
    assert access("127.0.0.1", {}, via_proxy=True) is Scrape.REFUSED
    assert access("127.0.0.1", {}, token, via_proxy=True) is Scrape.REFUSED
    assert access("127.0.0.1", right, token, via_proxy=True) is Scrape.ALLOWED
    assert access("127.0.0.1", wrong, token) is Scrape.GUESS  # a token sent must be right
    assert access(None, {}) is Scrape.REFUSED
    assert access("not-an-ip", {}) is Scrape.REFUSED


async def test_labels_stay_bounded(tmp_path: Path):
    async with simulator() as sim, edge(sim.url, tmp_path) as e:
        metrics = e.edge.metrics

        def rec(**fields: Any) -> RequestRecord:
            return RequestRecord(id="x", method="POST", route="/api/generate", **fields)

        # No model allowlist: only models the model server served become labels, at most 32.
        assert metrics.model_label(rec(model="llama3.2:1b", status=200)) == "llama3.2:1b"
        assert metrics.model_label(rec(model="nonsense", status=404)) == OTHER
        labels = {metrics.model_label(rec(model=f"m{i}", status=200)) for i in range(100)}
        assert len(labels) == 32  # 31 new names and "other" (the first slot was llama3.2:1b)
        assert metrics.route_label(rec()) == "/api/generate"
        assert metrics.route_label(RequestRecord(id="x", method="GET", route="/a/b")) == OTHER
        assert metrics.route_label(rec(feature="summarise")) == "/features/summarise"

    async with simulator() as sim, edge(sim.url, tmp_path, models=["llama3.2:1b"]) as e:
        metrics = e.edge.metrics
        assert metrics.model_label(rec(model="llama3.2:1b", status=500)) == "llama3.2:1b"
        assert metrics.model_label(rec(model="qwen2.5:0.5b", status=200)) == OTHER


async def test_observe_never_raises(tmp_path: Path):
    async with simulator() as sim, edge(sim.url, tmp_path) as e:
        metrics = e.edge.metrics
        broken = RequestRecord(id="x", method="POST", route="/api/generate", status=200)
        broken.tokens = -1  # a counter refuses to go down: prometheus-client raises
        with captured_logs() as logs:
            metrics.observe(broken)
            metrics.observe(broken)  # logged once, skipped both times
        assert [x["event"] for x in logs] == ["metrics.observe_failed"]
        ok = RequestRecord(id="y", method="GET", route="/healthz", status=200)
        metrics.observe(ok)
        count = metrics.requests.labels("/healthz", "200", "", "")._value.get()
        assert count == 1


async def test_grafana_dashboard_uses_only_served_metrics(
    tmp_path: Path, http: aiohttp.ClientSession
):
    suffixes = {"counter": ("_total",), "histogram": ("_bucket", "_count", "_sum")}
    async with (
        simulator() as sim,
        edge(sim.url, tmp_path) as e,
        http.get(f"{e.url}/metrics") as r,
    ):
        text = await r.text()
    served = {
        family.name + suffix
        for family in text_string_to_metric_families(text)
        for suffix in suffixes.get(family.type, ("",))
    }
    dashboard = orjson.loads((ROOT / "docs" / "grafana-dashboard.json").read_bytes())
    exprs = [t["expr"] for p in dashboard["panels"] for t in p["targets"]]
    used = {name for expr in exprs for name in re.findall(r"\bbackhaul_[a-z_]+", expr)}
    assert used and used <= served, used - served
