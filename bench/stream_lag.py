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
import json
import tempfile
import time
from datetime import datetime
from pathlib import Path
from typing import Any

import aiohttp

from bench import load, procs

STREAMS, TOKENS, TOK_PER_S, PER_STREAM = 64, 256, 290.0, 3
_STAMP = b'"created_at":"'


async def lagged(base_url: str) -> tuple[list[float], list[float], int]:
    """One W2 run: (TTFB ms, chunk lag ms, errors)."""
    ttfb: list[float] = []
    lag: list[float] = []
    errors = 0

    async def read(response: aiohttp.ClientResponse, start: float) -> None:
        nonlocal errors
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

    await load.streamed(base_url, STREAMS, TOKENS, read, TOK_PER_S, PER_STREAM)
    return ttfb, lag, errors


def figures(samples: list[float]) -> dict[str, float]:
    result = load.Result(len(samples), 0, 1, samples)
    return {"p50_ms": round(result.p50, 2), "p99_ms": round(result.p99, 2)}


def compare(targets: dict[str, str], rounds: int) -> dict[str, Any]:
    """Alternate the targets each round; pool each one's samples."""
    for url in targets.values():
        load.run(lagged(url))  # warm-up
    pooled: dict[str, tuple[list[float], list[float]]] = {n: ([], []) for n in targets}
    for _ in range(rounds):
        for name, url in targets.items():
            ttfb, lag, errors = load.run(lagged(url))
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
    gate_off = {"max_inflight": "64", "queue_max": "4096"}  # the simulator has 64 slots
    with (
        tempfile.TemporaryDirectory() as tmp,
        procs.simulator(tok_per_s=TOK_PER_S) as sim,
        procs.edge(sim, Path(tmp) / "edge.jsonl", **gate_off) as edge,
    ):
        targets = {"direct": sim, "edge": edge}
        if args.compare is None:
            result = compare(targets, args.rounds)
        else:
            env = {"PYTHONPATH": str(args.compare.resolve())}
            with procs.edge(sim, Path(tmp) / "other.jsonl", env, **gate_off) as other:
                targets[f"edge@{args.compare.name}"] = other
                result = compare(targets, args.rounds)
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
