"""Bad input gets a clear error in the route's shape, reaches nothing upstream, loses no line."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import pytest
import structlog

from tests.support.keyfiles import captured_logs
from tests.support.servers import edge, forwarded, simulator

FORBIDDEN_PATHS = [
    "/api/pull",
    "/api/push",
    "/api/create",
    "/api/copy",
    "/api/delete",
    "/api/blobs/sha256:0123abcd",
    "/api/../api/pull",
    "/api/%2e%2e/api/pull",
    "/api/%2E%2E/api/pull",
    "/api/./pull",
    "//api/pull",
    "/API/PULL",
    "/Api/Pull",
    "/api/pull/",
    "/api/pull?x=1",
    "/api/%70ull",
    "/api/generate/../pull",
    "/api/chat/",
    "/api/me",
    "/api/experimental/web_search",
    "/v1/responses",
]
METHODS = ["GET", "POST", "DELETE", "PUT", "HEAD", "PATCH"]


async def raw_request(url: str, method: str, path: str, body: bytes = b"") -> tuple[int, bytes]:
    """Send `path` byte for byte (client libraries normalise paths; attackers do not)."""
    host, port = url.removeprefix("http://").split(":")
    reader, writer = await asyncio.open_connection(host, int(port))
    head = (
        f"{method} {path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n"
        f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n"
    )
    writer.write(head.encode() + body)
    await writer.drain()
    data = await reader.read()
    writer.close()
    status_line, _, rest = data.partition(b"\r\n")
    return int(status_line.split()[1]), rest.partition(b"\r\n\r\n")[2]


def reached_upstream(sim: Any) -> list[str]:
    return forwarded(sim)


async def test_forbidden_paths_are_404_whatever_the_spelling(
    tmp_path: Path, http: aiohttp.ClientSession
):
    with captured_logs() as logs:
        async with simulator() as sim, edge(sim.url, tmp_path) as e:
            sent = 0
            for path in FORBIDDEN_PATHS:
                for method in METHODS:
                    status, body = await raw_request(e.url, method, path, b'{"model":"x"}')
                    sent += 1
                    assert status == 404, (method, path, status, body)
                    if method != "HEAD":
                        assert b'"not_found"' in body
            assert reached_upstream(sim) == []
            records = await e.records()
            assert {r["status"] for r in records} == {404}
            async with http.post(
                f"{e.url}/api/generate",
                json={"model": "llama3.2:1b", "prompt": "x", "stream": False},
            ) as r:
                assert r.status == 200
    # Every refusal is a telemetry line, or (past one address's burst: a scanner) counted in the
    # `auth.unauthenticated_suppressed` report the edge logs when it stops.
    counted = [x for x in logs if x["event"] == "auth.unauthenticated_suppressed"]
    assert len(records) + sum(x["count"] for x in counted) == sent


BAD_BODIES: list[tuple[str, bytes, str]] = [
    ("/api/generate", b"{", "not valid JSON"),
    ("/api/generate", b"", "empty"),
    ("/api/generate", b"[1, 2]", "JSON object"),
    ("/api/generate", b'{"model": 3, "prompt": "x"}', "'model'"),
    ("/api/generate", b'{"prompt": "x"}', "'model'"),
    ("/api/generate", b'{"model": "llama3.2:1b", "stream": "yes"}', "'stream'"),
    ("/api/generate", b'{"model": "llama3.2:1b", "prompt": 5}', "'prompt'"),
    ("/api/generate", b'{"model": "llama3.2:1b", "options": [1]}', "'options'"),
    ("/api/generate", b'{"model": "llama3.2:1b", "options": {"num_predict": "x"}}', "num_predict"),
    ("/api/chat", b'{"model": "llama3.2:1b", "messages": {"a": 1}}', "'messages'"),
    ("/api/chat", b'{"model": "llama3.2:1b", "messages": [3]}', "message"),
    ("/api/generate", b'{"model": "llama3.2:1b", "prompt": "\xff\xfe"}', "UTF-8"),
    ("/api/generate", b'{"model": "llama3.2:1b", "prompt": "\\ud800"}', "JSON"),
    ("/v1/chat/completions", b"{nope", "not valid JSON"),
    ("/v1/chat/completions", b'{"model": "llama3.2:1b", "max_tokens": true}', "max_tokens"),
    ("/v1/embeddings", b'{"model": "llama3.2:1b", "input": 7}', "'input'"),
]


@pytest.mark.parametrize(("path", "body", "says"), BAD_BODIES)
async def test_bad_bodies_are_400_in_the_route_shape(
    tmp_path: Path, path: str, body: bytes, says: str
):
    async with simulator() as sim, edge(sim.url, tmp_path) as e:
        status, raw = await raw_request(e.url, "POST", path, body)
        assert status == 400
        payload = orjson.loads(raw)
        if path.startswith("/v1/"):
            assert payload["error"]["type"] == "invalid_request"
            message = payload["error"]["message"]
        else:
            assert payload["type"] == "invalid_request"
            message = payload["error"]
        assert says in message, message
        assert "Traceback" not in message
        assert reached_upstream(sim) == []
        [record] = await e.records()
        assert record["status"] == 400 and record["type"] == "invalid_request"


async def test_oversized_body_is_413(tmp_path: Path, http: aiohttp.ClientSession):
    async with simulator() as sim, edge(sim.url, tmp_path, max_body_bytes=4096) as e:
        big = b'{"model": "llama3.2:1b", "prompt": "' + b"a" * 5000 + b'"}'
        async with http.post(
            f"{e.url}/api/generate", data=big, headers={"X-Request-Id": "big"}
        ) as r:
            assert r.status == 413
            assert (await r.json())["type"] == "payload_too_large"

        # No Content-Length: the limit holds while reading.
        async def chunks() -> AsyncIterator[bytes]:
            for _ in range(10):
                yield b"a" * 1000

        async with http.post(
            f"{e.url}/api/generate", data=chunks(), headers={"X-Request-Id": "chunked"}
        ) as r:
            assert r.status == 413
        assert reached_upstream(sim) == []
        assert (await e.record("big"))["type"] == "payload_too_large"
        assert (await e.record("chunked"))["type"] == "payload_too_large"
        async with http.post(
            f"{e.url}/api/generate", json={"model": "llama3.2:1b", "prompt": "x", "stream": False}
        ) as r:
            assert r.status == 200


async def test_wrong_method_is_405_json(tmp_path: Path, http: aiohttp.ClientSession):
    async with simulator() as sim, edge(sim.url, tmp_path) as e:
        async with http.get(f"{e.url}/v1/chat/completions") as r:
            assert r.status == 405
            assert (await r.json())["error"]["type"] == "method_not_allowed"
        assert reached_upstream(sim) == []


SECRET = "bh_" + "S" * 43


async def raw_exchange(url: str, data: bytes) -> tuple[int, dict[str, str], bytes]:
    """Send `data` as is and read one answer (by its Content-Length)."""
    host, port = url.removeprefix("http://").split(":")
    reader, writer = await asyncio.open_connection(host, int(port))
    writer.write(data)
    await writer.drain()
    async with asyncio.timeout(5):
        head = await reader.readuntil(b"\r\n\r\n")
        status_line, *lines = head.decode("latin-1").rstrip().split("\r\n")
        headers = {k.lower(): v.strip() for k, _, v in (line.partition(":") for line in lines)}
        body = await reader.readexactly(int(headers["content-length"]))
    writer.close()
    await writer.wait_closed()
    return int(status_line.split()[1]), headers, body


MALFORMED = [
    # bare-LF line endings (RFC 9112 wants CRLF), with a key in them
    f"POST /api/generate HTTP/1.1\nHost: x\nAuthorization: Bearer {SECRET}\n\n".encode(),
    b"GET /api/tags HTTP/1.1\r\nHost: x\r\nBad Header: y\r\n\r\n",  # space in a header name
    b"G\x00T / HTTP/1.1\r\n\r\n",  # not a method
    b"GET /" + b"a" * 20_000 + b" HTTP/1.1\r\n\r\n",  # request line over the limit
]


@pytest.mark.parametrize("data", MALFORMED, ids=["bare-lf", "header", "method", "long"])
async def test_malformed_requests_are_one_event_and_a_json_400(
    tmp_path: Path, data: bytes, caplog: pytest.LogCaptureFixture
):
    async with simulator() as sim, edge(sim.url, tmp_path) as e:
        with structlog.testing.capture_logs() as logs:
            status, headers, body = await raw_exchange(e.url, data)
        assert status == 400
        assert headers["server"] == "backhaul"
        assert headers["content-type"].startswith("application/json")
        error = orjson.loads(body)["error"]  # OpenAI's shape: there is no route to go by
        assert error["type"] == "bad_http_request" and error["request_id"]
        assert SECRET.encode() not in body
        [event] = [x for x in logs if x["event"] == "http.bad_request"]
        assert event["client"] == "127.0.0.1" and event["suppressed"] == 0
        assert SECRET not in repr(logs)
        # aiohttp's own logger said nothing: no traceback, no raw bytes.
        assert [r for r in caplog.records if r.name.startswith("aiohttp")] == []
        assert await e.records() == []  # not a request: no telemetry line
        assert reached_upstream(sim) == []


async def test_a_flood_of_malformed_requests_is_a_few_events(
    tmp_path: Path, http: aiohttp.ClientSession
):
    async with simulator() as sim, edge(sim.url, tmp_path) as e:
        with structlog.testing.capture_logs() as logs:
            for _ in range(50):
                status, _, _ = await raw_exchange(e.url, MALFORMED[0])
                assert status == 400
        events = [x for x in logs if x["event"] == "http.bad_request"]
        assert 1 <= len(events) <= 6
        # The edge still serves, and says no version on an ordinary answer either.
        async with http.get(f"{e.url}/api/tags") as r:
            assert r.status == 200
            assert r.headers["Server"] == "backhaul"


async def test_compressed_body_is_415_before_it_is_read(tmp_path: Path):
    async with simulator() as sim, edge(sim.url, tmp_path) as e:
        # Headers announce 10 MB of gzip that never comes: the answer comes at once anyway.
        head = (
            "POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nConnection: close\r\n"
            "Content-Type: application/json\r\nContent-Encoding: gzip\r\n"
            "Content-Length: 10000000\r\nX-Request-Id: gz\r\n\r\n"
        )
        status, _, body = await raw_exchange(e.url, head.encode())
        assert status == 415
        assert orjson.loads(body)["error"]["type"] == "unsupported_media_type"
        # Invalid gzip is the same 415, not a 500 with a traceback.
        bad = b"\x1f\x8bnot gzip at all"
        head = (
            "POST /api/generate HTTP/1.1\r\nHost: x\r\nConnection: close\r\n"
            f"Content-Encoding: GZIP\r\nContent-Length: {len(bad)}\r\nX-Request-Id: bad\r\n\r\n"
        )
        status, _, body = await raw_exchange(e.url, head.encode() + bad)
        assert status == 415 and orjson.loads(body)["type"] == "unsupported_media_type"
        for rid in ("gz", "bad"):
            record = await e.record(rid)
            assert record["status"] == 415 and record["bytes_in"] == 0
        # identity is not an encoding.
        plain = orjson.dumps({"model": "llama3.2:1b", "prompt": "x", "stream": False})
        head = (
            "POST /api/generate HTTP/1.1\r\nHost: x\r\nConnection: close\r\n"
            f"Content-Encoding: identity\r\nContent-Length: {len(plain)}\r\n\r\n"
        )
        status, _, _ = await raw_exchange(e.url, head.encode() + plain)
        assert status == 200
        assert reached_upstream(sim) == ["/api/generate"]
