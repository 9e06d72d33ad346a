"""Hardening of the edge's front door (issue 8): how the `Authorization` header is read, what
an anonymous flood of refusals costs the telemetry file, and what a JSON body's shape costs.

A real edge (with a keys file where it matters) in front of the simulator, aiohttp clients on
loopback; a flood comes from 127.0.0.2 or .3, the normal client from 127.0.0.1.
"""

from __future__ import annotations

import asyncio
import io
import itertools
import json
import time
from collections.abc import AsyncIterator, Mapping, Sequence
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from edge.exchange import Exchange
from edge.policy.guard import AnonymousLines
from edge.proxy import body_json
from edge.record import RequestRecord
from tests.support.keyfiles import Clock, bearer, captured_logs, keyed, reached, write_keys
from tests.support.servers import edge, simulator

MODEL = "llama3.2:1b"
GEN = {"model": MODEL, "prompt": "why", "stream": False}


async def test_a_key_after_a_tab_or_any_case_of_bearer_is_served_and_no_failure(
    tmp_path: Path, http: aiohttp.ClientSession
):
    secrets = write_keys(tmp_path / "keys.json", good={})
    key = secrets["good"]
    # RFC 9110: the scheme is case-insensitive; HTAB read as SP, as tolerant servers do.
    spellings = [
        f"Bearer\t{key}",
        f"bearer {key}",
        f"BEARER  {key}",
        f"Bearer \t {key} \t",
        f"\tBearer\t\t{key}",
    ]
    with captured_logs() as logs:
        async with simulator() as sim, edge(sim.url, tmp_path, **keyed(tmp_path)) as e:
            for n, value in enumerate(spellings):
                headers = {"Authorization": value, "X-Request-Id": f"ok-{n}"}
                async with http.post(f"{e.url}/api/generate", json=GEN, headers=headers) as r:
                    assert r.status == 200, value
                assert (await e.record(f"ok-{n}"))["key"] == "good"
            assert len(reached(sim)) == len(spellings)
            assert not e.edge.guard.bans._failures, "no failure counted towards a ban"

            # The wrong key with a TAB is still a wrong key, counted as one.
            wrong = {"Authorization": "Bearer\tbh_" + "A" * 43, "X-Request-Id": "wrong"}
            async with http.post(f"{e.url}/api/generate", json=GEN, headers=wrong) as r:
                assert r.status == 401
                assert (await r.json())["type"] == "unauthorized"
            assert (await e.record("wrong"))["type"] == "unauthorized"
            assert len(e.edge.guard.bans._failures) == 1
    failed = [x for x in logs if x["event"] == "auth.failed"]
    assert [x["request_id"] for x in failed] == ["wrong"]


@asynccontextmanager
async def client_from(source: str) -> AsyncIterator[aiohttp.ClientSession]:
    """A session whose connections come from `source`, a loopback address."""
    connector = aiohttp.TCPConnector(local_addr=(source, 0))
    timeout = aiohttp.ClientTimeout(total=30)
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
        yield session


async def flood(session: aiohttp.ClientSession, url: str, count: int, **headers: str) -> None:
    """`count` anonymous requests, each answered in the route's own JSON error shape."""

    async def one(i: int) -> None:
        rid = {"X-Request-Id": f"flood-{i}"}
        async with session.post(url, json=GEN, headers={**headers, **rid}) as r:
            body = await r.json()
            assert r.status in (401, 403), r.status
        error = body["error"] if isinstance(body["error"], dict) else body  # /v1 or /api
        assert error["type"] == ("unauthorized" if r.status == 401 else "banned")
        assert error["request_id"] == rid["X-Request-Id"]

    async with asyncio.timeout(30):
        await asyncio.gather(*(one(i) for i in range(count)))


def suppressed(logs: Sequence[Mapping[str, Any]], client: str, error_type: str) -> int:
    events = [x for x in logs if x["event"] == "auth.unauthenticated_suppressed"]
    return sum(x["count"] for x in events if x["client"] == client and x["type"] == error_type)


async def test_an_anonymous_flood_writes_a_bounded_number_of_lines_and_counts_the_rest(
    tmp_path: Path, http: aiohttp.ClientSession
):
    secrets = write_keys(tmp_path / "keys.json", good={})
    flooded, banned = 500, 100
    with captured_logs() as logs:
        async with simulator() as sim, edge(sim.url, tmp_path, **keyed(tmp_path)) as e:
            async with client_from("127.0.0.2") as attacker:
                await flood(attacker, f"{e.url}/api/generate", flooded)
                # A scheme and no key is no key: the same 401, the same count.
                await flood(attacker, f"{e.url}/v1/chat/completions", 1, Authorization="Bearer")
            # A banned address flooding on: the same bound (bans key on the address).
            e.edge.guard.bans.ban("127.0.0.3", time.time() + 3600)
            async with client_from("127.0.0.3") as banned_client:
                await flood(banned_client, f"{e.url}/api/generate", banned, **bearer("x"))
            # Another address is served and written as ever, with or without its key.
            for rid, headers in (("keyed", bearer(secrets["good"])), ("keyless", {})):
                headers = {**headers, "X-Request-Id": rid}
                async with http.post(f"{e.url}/api/generate", json=GEN, headers=headers) as r:
                    assert r.status == (200 if rid == "keyed" else 401)
                assert (await e.record(rid))["client"] == "127.0.0.1"
            records = await e.records()
        # The edge has stopped: its last report is out.
    lines = {
        client: [r for r in records if r["client"] == client]
        for client in ("127.0.0.2", "127.0.0.3")
    }
    # A burst of 10 per address, and what refilled while the test ran (10 a minute).
    assert 10 <= len(lines["127.0.0.2"]) <= 12
    assert 10 <= len(lines["127.0.0.3"]) <= 12
    assert {r["type"] for r in lines["127.0.0.2"]} == {"unauthorized"}
    assert {r["type"] for r in lines["127.0.0.3"]} == {"banned"}
    # Nothing lost: every refusal is a line or in a count.
    assert len(lines["127.0.0.2"]) + suppressed(logs, "127.0.0.2", "unauthorized") == flooded + 1
    assert len(lines["127.0.0.3"]) + suppressed(logs, "127.0.0.3", "banned") == banned
    assert not [x for x in logs if x["event"] == "auth.failed"], "no key-less 401 is a guess"
    assert len(reached(sim)) == 1


def test_an_address_spray_is_capped_in_all_and_its_counts_stay_bounded():
    clock = Clock()
    lines = AnonymousLines(max_entries=1000, clock=clock)
    written = 0
    with captured_logs() as logs:
        for i in range(5000):
            record = RequestRecord(id=str(i), method="POST", route="/api/generate",
                                   client=f"10.0.{i >> 8 & 255}.{i & 255}")  # fmt: skip
            ex = Exchange(path="/api/generate", record=record)
            lines.note(ex, "unauthorized")
            written += not ex.aggregated
        assert len(lines._counts) <= 1001  # the table, and `*` for the addresses past it
        clock.advance(60)
        lines.report()
    assert written == 600  # the cap in all, though each address sent one
    events = [x for x in logs if x["event"] == "auth.unauthenticated_suppressed"]
    assert len(events) == 101  # 100 addresses named, the rest in one event
    assert sum(x["count"] for x in events) == 5000 - 600
    assert events[-1]["client"] == "*" and events[0]["window_s"] == 60.0


def nested(depth: int) -> bytes:
    """A JSON value `depth` levels deep, as text (orjson writes no deeper than 255): lists, an
    object at every tenth level."""
    text = b'"leaf"'
    for level in range(depth):
        text = b'{"a":' + text + b"}" if level % 10 == 9 else b"[" + text + b"]"
    return text


def body_with(field: bytes, value: bytes, **fields: Any) -> bytes:
    """`fields` as a JSON object, with `field` set to the JSON text `value`."""
    return orjson.dumps(fields)[:-1] + b',"' + field + b'":' + value + b"}"


async def test_bodies_nested_too_deep_are_400_in_the_routes_shape_and_no_traceback(
    tmp_path: Path, http: aiohttp.ClientSession, caplog: pytest.LogCaptureFixture
):
    json = {"Content-Type": "application/json"}
    with captured_logs() as logs:
        async with simulator() as sim, edge(sim.url, tmp_path) as e:
            # `format` is copied upstream as it is: the whole body is as deep as it says. The top
            # is one level, the format the rest: an object (a schema), as Ollama answers a list 500.
            schema = b'{"a":' + nested(body_json.MAX_DEPTH - 2) + b"}"
            limit = body_with(b"format", schema, **GEN)
            async with http.post(f"{e.url}/api/generate", data=limit, headers=json) as r:
                assert r.status == 200, await r.text()
            # 65 was relayed; 300 passed the checks and failed the edge's own orjson.dumps
            # (255 levels); orjson reads no deeper than 1,024, 5,000 was its parse error.
            for depth in (65, 300, 1024, 5000):
                body = body_with(b"format", nested(depth - 1), **GEN)
                headers = {**json, "X-Request-Id": f"deep-{depth}"}
                async with http.post(f"{e.url}/api/generate", data=body, headers=headers) as r:
                    assert r.status == 400, depth
                    error = await r.json()
                assert error["type"] == "invalid_request" and "nested" in error["error"]
                assert (await e.record(f"deep-{depth}"))["type"] == "invalid_request"
                message = b'[{"role":"user","content":' + nested(depth - 3) + b"}]"
                chat = body_with(b"messages", message, model=MODEL)
                async with http.post(f"{e.url}/v1/chat/completions", data=chat, headers=json) as r:
                    assert r.status == 400, depth
                    assert (await r.json())["error"]["type"] == "invalid_request"
            assert len(reached(sim)) == 1, "only the body within the limit"
    assert not [x for x in logs if x.get("exc_info") or x["log_level"] == "error"]
    assert "Traceback" not in caplog.text


async def test_a_very_wide_body_does_not_stall_the_loop(
    tmp_path: Path, http: aiohttp.ClientSession
):
    # A million small keys, 13 MB: within the default 20 MB body limit.
    wide = orjson.dumps({**GEN, **{f"k{i:07d}": 1 for i in range(1_000_000)}})
    started = time.perf_counter()
    orjson.loads(wide)  # what parsing it costs here, now: the loop would stall that long
    parse_s = time.perf_counter() - started
    async with simulator() as sim, edge(sim.url, tmp_path) as e:
        answers: list[float] = []
        probing, done = asyncio.Event(), asyncio.Event()

        async def probe() -> None:
            while not done.is_set():
                async with http.get(f"{e.url}/healthz") as r:
                    assert r.status == 200
                answers.append(time.perf_counter())
                if len(answers) == 5:
                    probing.set()

        async with asyncio.timeout(30), asyncio.TaskGroup() as tasks:
            tasks.create_task(probe())
            await probing.wait()
            sent = time.perf_counter()
            try:
                headers = {"Content-Type": "application/json", "X-Request-Id": "wide"}
                async with http.post(
                    f"{e.url}/api/generate", data=io.BytesIO(wide), headers=headers
                ) as r:
                    assert r.status == 413
                    assert (await r.json())["type"] == "payload_too_large"
            finally:
                done.set()
        during = [t for t in answers if t >= sent]
        gaps = [b - a for a, b in itertools.pairwise(answers) if b >= sent]
        # Answered all along: no pause near what the parse alone takes (and the upstream
        # body's build took twice that again after it, before the fix).
        assert len(during) >= 3
        assert max(gaps) < parse_s / 4, (max(gaps), parse_s)
        assert (await e.record("wide"))["status"] == 413

        # A large body within the bounds is parsed in a worker thread, and served.
        large = {**GEN, "prompt": "why, " * 20_000 + "x" * 200_000}  # 300 KB: over THREAD_BYTES
        assert len(orjson.dumps(large)) > body_json.THREAD_BYTES
        async with http.post(f"{e.url}/api/generate", json=large) as r:
            assert r.status == 200
        assert reached(sim) == ["/api/generate"]


JSON = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**63), 2**64 - 1)
    | st.floats(allow_nan=False, allow_infinity=False)
    # Strings made of what the scan looks at: quotes, backslashes, brackets, separators.
    | st.text(st.sampled_from('"\\[]{},:/bnu x\n\u00e9'), max_size=12),
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=4), inner, max_size=4)
    ),
    max_leaves=40,
)


def items_and_depth(value: Any) -> tuple[int, int]:
    """What `body_json.measure` must find, from the parsed value."""
    if isinstance(value, (list, dict)):
        children = list(value.values()) if isinstance(value, dict) else value
        figures = [items_and_depth(child) for child in children]
        items = 1 + max(len(children) - 1, 0) + (len(children) if isinstance(value, dict) else 0)
        return items + sum(i for i, _ in figures), 1 + max((d for _, d in figures), default=0)
    return 0, 0


@settings(max_examples=300, deadline=None)
@given(value=JSON, spelling=st.sampled_from(["compact", "spaced", "ascii", "slashes"]))
def test_the_shape_scan_is_exact_on_valid_json(value: Any, spelling: str):
    raw = {
        "compact": lambda: orjson.dumps(value),
        "spaced": lambda: json.dumps(value, indent=1, ensure_ascii=False).encode(),
        "ascii": lambda: json.dumps(value).encode(),  # every non-ASCII character as \\uXXXX
        "slashes": lambda: json.dumps(value).replace("/", "\\/").encode(),  # PHP's spelling
    }[spelling]()
    assert body_json.measure(raw, 10_000, 100) == items_and_depth(value)


async def test_scanner_404s_and_anonymous_feature_429s_are_counted_past_a_burst(
    tmp_path: Path, http: aiohttp.ClientSession
):
    """A key-less scanner's `/.env` (404 before any key is looked at) and an anonymous
    feature's 429s are aggregated like key-less 401s: one address cannot rotate the log."""
    summary = {"model": "llama3.2:1b", "prompt": "Summarise: {input}", "anonymous": True, "rpm": 1}
    async with (
        simulator() as sim,
        edge(sim.url, tmp_path, **keyed(tmp_path, features={"summary": summary})) as e,
    ):
        for i in range(40):
            async with http.get(f"{e.url}/.env", headers={"X-Request-Id": f"s{i}"}) as r:
                assert r.status == 404
        statuses = []
        for i in range(40):
            async with http.post(
                f"{e.url}/features/summary", json={"input": "hi"}, headers={"X-Request-Id": f"f{i}"}
            ) as r:
                statuses.append(r.status)
        assert statuses.count(429) >= 38
        records = await e.records()
        scans = [r for r in records if r["id"].startswith("s")]
        limited = [r for r in records if r["id"].startswith("f") and r["status"] == 429]
        assert 1 <= len(scans) <= 12 and {r["status"] for r in scans} == {404}
        assert 1 <= len(limited) <= 12
