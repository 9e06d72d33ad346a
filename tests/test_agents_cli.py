"""`backhaul-edge agents`: the running edge's pool, asked of a real edge serving a real simulator.

The command is run as the operator runs it, the console script in a subprocess: its stdout and
stderr are the command's alone (the edge in this process logs to this process's stdout).
"""

from __future__ import annotations

import asyncio
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

import aiohttp
import orjson
from aiohttp import hdrs, web

from edge.ops.agents import ago, table
from tests.support.servers import Edge, edge, free_port, serving, simulator

TOKEN = "t" * 40
MODELS = ("llama3.2:1b", "qwen2.5:0.5b")


def config(tmp_path: Path, token: str | None = None, *lines: str) -> Path:
    """An edge.toml for the command (never the machine's /etc/backhaul/edge.toml)."""
    path = tmp_path / "edge.toml"
    path.write_text(
        "".join(f"{line}\n" for line in lines) + (f'metrics_token = "{token}"\n' if token else "")
    )
    return path


@dataclass
class Ran:
    status: int | None
    out: str
    err: str


async def agents_cmd(*argv: str) -> Ran:
    """`backhaul-edge agents ARGV`, run to its end."""
    script = Path(sys.executable).parent / "backhaul-edge"
    proc = await asyncio.create_subprocess_exec(
        script, "agents", *argv, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE
    )
    async with asyncio.timeout(30):
        out, err = await proc.communicate()
    return Ran(proc.returncode, out.decode(), err.decode())


async def wait_probed(e: Edge) -> None:
    async with asyncio.timeout(5):
        await e.agent.refreshed.wait()


async def test_the_table_names_the_agent_its_state_and_models(tmp_path: Path) -> None:
    async with simulator(models=MODELS) as sim, edge(sim.url, tmp_path) as e:
        await wait_probed(e)
        ran = await agents_cmd("--url", e.url, "--config", str(config(tmp_path)))
        capacity = e.agent.capacity
    assert ran.status == 0, ran.err
    header, *rows = ran.out.splitlines()
    assert header.split() == ["NAME", "STATE", "MODELS", "LOADED", "IN-FLIGHT", "TOK/S", "SINCE"]
    assert len(rows) == 1
    name, state, models, _loaded, inflight, _tps, *since = rows[0].split()
    assert (name, state, inflight) == ("default", "up", f"0/{capacity}")
    assert sorted(models.split(",")) == sorted(MODELS)
    assert since[-1] == "ago"


async def test_json_is_the_pool_snapshot(tmp_path: Path) -> None:
    async with simulator() as sim, edge(sim.url, tmp_path) as e:
        await wait_probed(e)
        ran = await agents_cmd("--url", e.url, "--config", str(config(tmp_path)), "--json")
        snapshot = e.edge.pool.snapshot()
    assert ran.status == 0, ran.err
    printed = orjson.loads(ran.out)["agents"]
    assert [a["name"] for a in printed] == [a["name"] for a in snapshot] == ["default"]
    assert printed[0]["models"] == snapshot[0]["models"]
    assert printed[0]["state"] == "up"


async def test_without_url_a_wildcard_listen_address_is_asked_on_loopback(
    tmp_path: Path,
) -> None:
    async with simulator() as sim, edge(sim.url, tmp_path) as e:
        await wait_probed(e)
        port = e.url.rsplit(":", 1)[1]
        ran = await agents_cmd(
            "--config", str(config(tmp_path, None, 'host = "::"', f"port = {port}"))
        )
    assert ran.status == 0, ran.err
    assert ran.out.splitlines()[1].split()[:2] == ["default", "up"]


async def test_a_long_model_list_is_counted(tmp_path: Path) -> None:
    many = ("llama3.2:1b", "qwen2.5:0.5b", "nomic-embed-text", "gemma3:1b")
    async with simulator(models=many) as sim, edge(sim.url, tmp_path) as e:
        await wait_probed(e)
        ran = await agents_cmd("--url", e.url, "--config", str(config(tmp_path)))
    assert ran.status == 0, ran.err
    row = ran.out.splitlines()[1]
    assert row.split()[:4] == ["default", "up", "4", "models"]


async def test_an_edge_not_listening_is_exit_1_naming_the_url(tmp_path: Path) -> None:
    url = f"http://127.0.0.1:{free_port()}"
    ran = await agents_cmd("--url", url, "--config", str(config(tmp_path)))
    assert ran.status == 1
    assert ran.out == ""
    [line] = ran.err.splitlines()
    assert f"cannot reach the edge at {url}/agents" in line


@asynccontextmanager
async def forwarding_proxy(upstream: str) -> AsyncIterator[str]:
    """A reverse proxy on loopback that says whom it forwards for, as Caddy or nginx in front
    of the edge would: the edge must not take its requests for a loopback scraper's."""

    async def forward(request: web.Request) -> web.Response:
        headers = {hdrs.X_FORWARDED_FOR: "203.0.113.9"}
        if hdrs.AUTHORIZATION in request.headers:
            headers[hdrs.AUTHORIZATION] = request.headers[hdrs.AUTHORIZATION]
        async with (
            aiohttp.ClientSession() as session,
            session.get(upstream + request.path, headers=headers) as answer,
        ):
            body = await answer.read()
            return web.Response(status=answer.status, body=body, content_type=answer.content_type)

    app = web.Application()
    app.router.add_get("/{tail:.*}", forward)
    async with serving(app) as url:
        yield url


async def test_through_a_proxy_without_the_token_is_exit_1_naming_403(tmp_path: Path) -> None:
    async with (
        simulator() as sim,
        edge(sim.url, tmp_path, metrics_token=TOKEN) as e,
        forwarding_proxy(e.url) as proxy,
    ):
        ran = await agents_cmd("--url", proxy, "--config", str(config(tmp_path)))
    assert ran.status == 1
    assert ran.out == ""
    [line] = ran.err.splitlines()
    assert f"{proxy}/agents answered 403: metrics are served to loopback scrapers" in line


async def test_through_a_proxy_the_configured_token_is_sent(tmp_path: Path) -> None:
    async with (
        simulator() as sim,
        edge(sim.url, tmp_path, metrics_token=TOKEN) as e,
        forwarding_proxy(e.url) as proxy,
    ):
        await wait_probed(e)
        ran = await agents_cmd("--url", proxy, "--config", str(config(tmp_path, TOKEN)))
    assert ran.status == 0, ran.err
    assert ran.out.splitlines()[1].split()[:2] == ["default", "up"]


async def test_a_url_that_is_not_http_is_a_usage_error(tmp_path: Path) -> None:
    ran = await agents_cmd("--url", "file:///etc/passwd", "--config", str(config(tmp_path)))
    assert ran.status == 2
    assert "is not http:// or https://" in ran.err


def test_cooling_is_a_column_only_when_an_agent_cools_down() -> None:
    row = {
        "name": "gpu1",
        "state": "up",
        "models": ["a"],
        "loaded": [],
        "in_flight": 1,
        "capacity": 2,
        "tok_per_s": 41.25,
        "since": 1000.0,
    }
    calm = table([{**row, "cooling_s": 0.0}], now=1192.0)
    assert calm.splitlines()[1].split() == ["gpu1", "up", "a", "-", "1/2", "41.2", "3m12s", "ago"]
    assert "COOLING" not in calm
    cooling = table([{**row, "cooling_s": 12.4}, {**row, "name": "gpu2", "cooling_s": 0}], 1192)
    header, first, second = cooling.splitlines()
    assert header.split()[-1] == "COOLING"
    assert first.split()[-1] == "12s"
    assert second.split()[-1] == "-"


def test_ago_reads_as_a_duration() -> None:
    assert [ago(s) for s in (-1, 5, 192, 7500, 3 * 86400 + 4 * 3600)] == [
        "0s ago",
        "5s ago",
        "3m12s ago",
        "2h05m ago",
        "3d04h ago",
    ]
