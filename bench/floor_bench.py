"""What is left of the edge's CPU per request, against the floors under it, in one run.

Issue 15 asks for ≤ 150 µs of edge CPU per non-streamed request. This measures, on one simulator
and one load (W1, `--requests` at c=`--concurrency`, alternating rounds), the CPU per request of:

- `server`: an aiohttp server that answers a canned body: what aiohttp's server costs a request;
- `lean`: the same server relaying through a minimal keep-alive HTTP/1.1 client (no chunked
  encoding, no timeouts, no pool limits: a measuring stick, not a client to ship);
- `aiohttp`: the same server relaying through aiohttp's client, as the edge does (the bare
  aiohttp proxy of docs/performance.md);
- `edge`: `backhaul-edge serve` with bench/run.py's settings.

`aiohttp - server` is aiohttp's client's share, `lean - server` a minimal client's, and
`edge - aiohttp` what the edge's own work costs (keys, limits, the body policy, the gate and the
pool, telemetry, metrics). CPU comes from /proc (bench/cpu.py), so the figures are per unit of
work, steadier than latency on a shared machine.

    .venv/bin/python -m bench.floor_bench [--requests 4000] [--rounds 3] [--json]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import tempfile
from collections.abc import AsyncIterator
from contextlib import ExitStack
from pathlib import Path
from typing import cast

import uvloop
from aiohttp import ClientSession, TCPConnector, web

from bench import cpu, load, procs

CANNED = (
    b'{"model":"llama3.2:1b","created_at":"2024-01-01T00:00:00Z","response":"'
    + b"word " * 64
    + b'","done":true}'
)
KINDS = ("server", "lean", "aiohttp", "edge")


class _Lean(asyncio.Protocol):
    """One kept-alive connection of the minimal client: answers with a Content-Length only."""

    def __init__(self) -> None:
        self.buffer = bytearray()
        self.answer: asyncio.Future[bytes] | None = None
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's is not a subclass

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        end = self.buffer.find(b"\r\n\r\n")
        if end < 0 or self.answer is None:
            return
        head = bytes(self.buffer[:end]).lower()
        at = head.find(b"content-length:") + len(b"content-length:")
        length = int(head[at : head.find(b"\r\n", at)])
        if len(self.buffer) - end - 4 >= length:
            body = bytes(self.buffer[end + 4 : end + 4 + length])
            del self.buffer[: end + 4 + length]
            answer, self.answer = self.answer, None
            answer.set_result(body)

    def connection_lost(self, exc: Exception | None) -> None:
        if self.answer is not None and not self.answer.done():
            self.answer.set_exception(ConnectionError("closed"))


def _app(kind: str, upstream: str) -> web.Application:
    host, _, port = upstream.removeprefix("http://").partition(":")
    idle: list[_Lean] = []
    app = web.Application()

    async def lean(body: bytes) -> bytes:
        loop = asyncio.get_running_loop()
        conn = idle.pop() if idle else (await loop.create_connection(_Lean, host, int(port)))[1]
        conn.answer = loop.create_future()
        assert conn.transport is not None
        conn.transport.write(
            b"POST /api/generate HTTP/1.1\r\nHost: %s\r\nContent-Type: application/json\r\n"
            b"Content-Length: %d\r\n\r\n%s" % (host.encode(), len(body), body)
        )
        answer = await conn.answer
        idle.append(conn)
        return answer

    async def handle(request: web.Request) -> web.Response:
        body = await request.read()
        if kind == "server":
            answer = CANNED
        elif kind == "lean":
            answer = await lean(body)
        else:
            headers = {"Content-Type": "application/json"}
            async with app["session"].post(
                f"{upstream}/api/generate", data=body, headers=headers
            ) as r:
                answer = await r.read()
        return web.Response(body=answer, content_type="application/json")

    async def session(app: web.Application) -> AsyncIterator[None]:
        app["session"] = ClientSession(connector=TCPConnector(limit=0))
        yield
        await app["session"].close()

    app.router.add_post("/api/generate", handle)
    if kind == "aiohttp":
        app.cleanup_ctx.append(session)
    return app


def serve(kind: str, port: int, upstream: str) -> None:
    web.run_app(
        _app(kind, upstream), host="127.0.0.1", port=port, print=None, loop=uvloop.new_event_loop()
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=4000)
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--json", action="store_true")
    parser.add_argument(
        "--serve", nargs=3, metavar=("KIND", "PORT", "UPSTREAM"), help=argparse.SUPPRESS
    )
    args = parser.parse_args()
    if args.serve:
        kind, port, upstream = args.serve
        serve(kind, int(port), upstream)
        return
    spent: dict[str, list[float]] = {kind: [] for kind in KINDS}
    with tempfile.TemporaryDirectory() as tmp, ExitStack() as stack:
        sim = stack.enter_context(procs.simulator())
        targets: dict[str, tuple[str, int]] = {}
        for kind in KINDS[:3]:
            port = procs.free_port()
            argv = [sys.executable, "-m", "bench.floor_bench", "--serve", kind, str(port), sim]
            log = Path(tmp) / f"{kind}.log"  # not a pipe nobody reads while it runs
            pid = stack.enter_context(procs.process(argv, port, log=log))
            targets[kind] = (f"http://127.0.0.1:{port}", pid)
        edge = stack.enter_context(
            procs.edge(
                sim, Path(tmp) / "t.jsonl", max_inflight="64", queue_max="4096", log_level="warning"
            )
        )
        targets["edge"] = (edge, procs.PIDS[edge])
        for url, _ in targets.values():
            load.run(load.w1(url, args.concurrency, load.WARM_UP_REQUESTS))
        for _ in range(args.rounds):
            for kind, (url, pid) in targets.items():
                before = cpu.cpu_seconds(pid)
                result = load.run(load.w1(url, args.concurrency, args.requests))
                if result.errors:
                    raise RuntimeError(f"{kind}: {result.errors} failed requests")
                spent[kind].append((cpu.cpu_seconds(pid) - before) / args.requests * 1e6)
    figures = {kind: statistics.median(values) for kind, values in spent.items()}
    figures["aiohttp client (aiohttp - server)"] = figures["aiohttp"] - figures["server"]
    figures["minimal client (lean - server)"] = figures["lean"] - figures["server"]
    figures["edge's own work (edge - aiohttp)"] = figures["edge"] - figures["aiohttp"]
    if args.json:
        print(json.dumps({"cpu_us_per_request": figures, "rounds": spent}, indent=2))
        return
    rounds = {kind: [round(us) for us in values] for kind, values in spent.items()}
    print(
        f"CPU µs per W1 request (median of {args.rounds} rounds of {args.requests} at "
        f"c={args.concurrency}; every round: {rounds})"
    )
    for name, value in figures.items():
        print(f"  {name:<36} {value:7.1f}")


if __name__ == "__main__":
    main()
