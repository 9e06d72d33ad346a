"""The JSONL log: one line per request, rotated by size, reopened on demand, survives a bad disk."""

from __future__ import annotations

import asyncio
from pathlib import Path

import aiohttp
import orjson

from edge.record import FIELDS, RequestRecord, parse_line
from edge.telemetry import TelemetryWriter
from tests.support.servers import edge, simulator

GEN = {"model": "llama3.2:1b", "prompt": "hi", "stream": False}


async def test_one_line_per_request_under_concurrency(tmp_path: Path, http: aiohttp.ClientSession):
    async with simulator(parallel=8) as sim, edge(sim.url, tmp_path, max_inflight=8) as e:

        async def call(i: int) -> None:
            path = "/api/generate" if i % 3 else "/api/nope"
            async with http.post(
                f"{e.url}{path}", json=GEN, headers={"X-Request-Id": f"c{i}"}
            ) as r:
                await r.read()

        await asyncio.gather(*(call(i) for i in range(60)))
        records = await e.records()
        assert sorted(r["id"] for r in records) == sorted(f"c{i}" for i in range(60))
        for record in records:
            assert list(record) == list(FIELDS)
        assert sum(r["status"] == 404 for r in records) == 20


async def test_health_probes_are_not_logged(tmp_path: Path, http: aiohttp.ClientSession):
    async with simulator() as sim, edge(sim.url, tmp_path) as e:
        for path in ("/healthz", "/readyz"):
            async with http.get(f"{e.url}{path}") as r:
                assert r.status == 200
        assert await e.records() == []


def test_rotation_by_size(tmp_path: Path):
    path = tmp_path / "t.jsonl"
    writer = TelemetryWriter(path, max_bytes=2000, backups=2)
    for i in range(60):
        writer.write(RequestRecord(id=f"r{i}", method="POST", route="/api/chat"))
    writer.close()
    rotated = [path, path.with_name("t.jsonl.1"), path.with_name("t.jsonl.2")]
    assert all(p.exists() for p in rotated)
    assert not path.with_name("t.jsonl.3").exists()
    for p in rotated:
        assert p.stat().st_size <= 2000
        for line in p.read_bytes().splitlines():
            parse_line(line)  # every line whole
    ids = [orjson.loads(x)["id"] for p in reversed(rotated) for x in p.read_bytes().splitlines()]
    assert ids == [f"r{i}" for i in range(60 - len(ids), 60)]  # newest kept, in order


def test_rotation_ages_gzipped_backups_too(tmp_path: Path):
    path = tmp_path / "t.jsonl"
    (tmp_path / "t.jsonl.1.gz").write_bytes(b"one")  # an operator gzipped the older files
    (tmp_path / "t.jsonl.2.gz").write_bytes(b"two")
    writer = TelemetryWriter(path, max_bytes=300, backups=2)
    for i in range(3):  # ~230 bytes a line: every line after the first rotates
        writer.write(RequestRecord(id=f"r{i}", method="POST", route="/api/chat"))
    writer.close()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["t.jsonl", "t.jsonl.1", "t.jsonl.2"]
    assert orjson.loads(path.read_bytes())["id"] == "r2"


def test_reopen_after_logrotate_moved_the_file(tmp_path: Path):
    path = tmp_path / "t.jsonl"
    writer = TelemetryWriter(path)
    writer.write(RequestRecord(id="before", method="GET", route="/api/tags"))
    assert writer.flush()
    path.rename(tmp_path / "t.jsonl.old")
    writer.reopen()  # what SIGHUP does
    writer.write(RequestRecord(id="after", method="GET", route="/api/tags"))
    writer.close()
    assert orjson.loads(path.read_bytes())["id"] == "after"
    assert orjson.loads((tmp_path / "t.jsonl.old").read_bytes())["id"] == "before"


async def test_failing_disk_is_logged_and_serving_goes_on(
    tmp_path: Path, http: aiohttp.ClientSession
):
    async with simulator() as sim, edge(sim.url, tmp_path) as e:
        blocked = tmp_path / "telemetry.jsonl"
        blocked.mkdir()  # the path is now a directory: every open fails with EISDIR
        for _ in range(3):
            async with http.post(f"{e.url}/api/generate", json=GEN) as r:
                assert r.status == 200
        writer = e.edge.telemetry
        assert await writer.wait_flushed()
        assert writer.dropped == 3
        blocked.rmdir()  # the disk recovers: lines flow again
        async with http.post(f"{e.url}/api/generate", json=GEN) as r:
            assert r.status == 200
        assert len(await e.records()) == 1
