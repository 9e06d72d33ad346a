"""Streaming through the edge, chunk by chunk: does the decoupled relay delay a fast reader?

Run: `.venv/bin/python -m bench.stream_lag [--rounds N] [--compare DIR]`.

The W2 load (64 streams always in flight, 256 tokens each at 290 tok/s, arrivals spread) read at
full speed, direct from the simulator and through the edge. Two figures per target: the time to
first byte, and the lag of every chunk: the moment the client read a line minus the
`created_at` the simulator stamped on it when it made it (one host, one wall clock), so the
relay's cost shows for every chunk, not just the first. `--compare DIR` also runs an edge from
another source tree (e.g. `git archive <commit> | tar -x -C DIR`), alternating with this one,
to compare two relays on the same simulator in the same run.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import tempfile
import time
from datetime import datetime
from pathlib import Path
from typing import Any

import aiohttp
import uvloop

from bench import load, procs

STREAMS, TOKENS, TOK_PER_S, PER_STREAM = 64, 256, 290.0, 3
_STAMP = b'"created_at":"'


async def lagged(base_url: str) -> tuple[list[float], list[float], int]:
    """One W2 run: (TTFB ms, chunk lag ms, errors)."""
    body = load.generate_body(TOKENS, stream=True)
    ttfb: list[float] = []
    lag: list[float] = []
    errors = 0
    duration = TOKENS / TOK_PER_S
    connector = aiohttp.TCPConnector(limit=0)
    async with aiohttp.ClientSession(connector=connector) as session:

        async def one() -> None:
            nonlocal errors
            start = time.perf_counter()
            async with session.post(f"{base_url}/api/generate", json=body) as response:
                first = True
                async for line in response.content:
                    now = time.time()
                    if first:
                        ttfb.append((time.perf_counter() - start) * 1000.0)
                        first = False
                    at = line.find(_STAMP) + len(_STAMP)
                    made = datetime.fromisoformat(line[at : at + 27].decode()).timestamp()
                    lag.append((now - made) * 1000.0)
                if response.status != 200 or first:
                    errors += 1

        async def worker(i: int) -> None:
            await asyncio.sleep(i * duration / STREAMS)
            for _ in range(PER_STREAM):
                await one()

        async with asyncio.timeout(load.RUN_DEADLINE_S), asyncio.TaskGroup() as group:
            for i in range(STREAMS):
                group.create_task(worker(i))
    return ttfb, lag, errors


def run_once(url: str) -> tuple[list[float], list[float], int]:
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        return runner.run(lagged(url))


def figures(samples: list[float]) -> dict[str, float]:
    result = load.Result(len(samples), 0, 1, samples)
    return {"p50_ms": round(result.p50, 2), "p99_ms": round(result.p99, 2)}


def compare(targets: dict[str, str], rounds: int) -> dict[str, Any]:
    """Alternate the targets each round; pool each one's samples."""
    for url in targets.values():
        run_once(url)  # warm-up
    pooled: dict[str, tuple[list[float], list[float]]] = {n: ([], []) for n in targets}
    for _ in range(rounds):
        for name, url in targets.items():
            ttfb, lag, errors = run_once(url)
            if errors:
                raise RuntimeError(f"{name}: {errors} failed streams")
            pooled[name][0].extend(ttfb)
            pooled[name][1].extend(lag)
    return {
        name: {"ttfb": figures(ttfb), "chunk_lag": figures(lag), "chunks": len(lag)}
        for name, (ttfb, lag) in pooled.items()
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--compare", type=Path, help="another source tree's edge, run too")
    args = parser.parse_args()
    sim_port, edge_port = procs.free_port(), procs.free_port()
    sim = f"http://127.0.0.1:{sim_port}"
    sim_args = [
        str(procs.BIN / "backhaul-agent"), "simulate", "--port", str(sim_port),
        "--tok-per-s", str(TOK_PER_S), "--parallel", "64", "--max-queue", "4096",
        "--reply-tokens", str(TOKENS),
    ]  # fmt: skip
    with tempfile.TemporaryDirectory() as tmp:

        def edge_env(port: int, name: str) -> dict[str, str]:
            return {
                "BACKHAUL_EDGE_PORT": str(port),
                "BACKHAUL_EDGE_UPSTREAM": sim,
                "BACKHAUL_EDGE_TELEMETRY_PATH": str(Path(tmp) / f"{name}.jsonl"),
                "BACKHAUL_EDGE_AUTH": "none",
                "BACKHAUL_EDGE_MAX_INFLIGHT": "64",
                "BACKHAUL_EDGE_QUEUE_MAX": "4096",
            }

        edge_cmd = [str(procs.BIN / "backhaul-edge"), "serve"]
        with (
            procs.process(sim_args, sim_port),
            procs.process(edge_cmd, edge_port, edge_env(edge_port, "edge")),
        ):
            targets = {"direct": sim, "edge": f"http://127.0.0.1:{edge_port}"}
            if args.compare is None:
                result = compare(targets, args.rounds)
            else:
                other_port = procs.free_port()
                env = edge_env(other_port, "other")
                env["PYTHONPATH"] = str(args.compare.resolve())
                with procs.process(edge_cmd, other_port, env):
                    targets[f"edge@{args.compare.name}"] = f"http://127.0.0.1:{other_port}"
                    result = compare(targets, args.rounds)
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
