"""The load generator for the benchmarks: W1 (non-streamed) and W2 (streamed TTFB).

It runs in the benchmark's own process, apart from the servers it measures, and only ever
talks to 127.0.0.1. Every run is bounded by a request count and a deadline.
"""

from __future__ import annotations

import asyncio
import statistics
import time
from collections.abc import Awaitable, Callable, Coroutine
from dataclasses import dataclass
from typing import Any, TypeVar

import aiohttp
import uvloop

# No run may last longer than this (s), whatever the machine is doing.
RUN_DEADLINE_S = 300.0
# Requests each side of `w1_rounds` gets before its rounds: connections opened, caches warm.
WARM_UP_REQUESTS = 200

T = TypeVar("T")
# Reads one streamed answer; given the response and the perf_counter() its request began at.
StreamReader = Callable[[aiohttp.ClientResponse, float], Awaitable[None]]


@dataclass(frozen=True)
class Result:
    requests: int
    errors: int
    seconds: float
    latencies_ms: list[float]  # whole request for W1, time to first byte for W2
    chunks: int = 0  # W2: the NDJSON lines the client read (a token each, and each stream's last)

    @property
    def rps(self) -> float:
        return self.requests / self.seconds if self.seconds else 0.0

    def pct(self, q: float) -> float:
        if not self.latencies_ms:
            return float("nan")
        data = sorted(self.latencies_ms)
        return data[min(len(data) - 1, round(q / 100 * (len(data) - 1)))]

    @property
    def p50(self) -> float:
        return statistics.median(self.latencies_ms) if self.latencies_ms else float("nan")

    @property
    def p99(self) -> float:
        return self.pct(99)

    def w1_figures(self) -> dict[str, float]:
        """The figures a W1 run reports: requests a second, p50 and p99 (`w1_text` prints them)."""
        return {"rps": self.rps, "p50_ms": self.p50, "p99_ms": self.p99}


def w1_text(figures: dict[str, float]) -> str:
    """A W1 run's `w1_figures` as the benchmarks print them, aligned from one line to the next."""
    return (
        f"{figures['rps']:7.0f} req/s p50 {figures['p50_ms']:6.2f} ms "
        f"p99 {figures['p99_ms']:6.2f} ms"
    )


def run(coro: Coroutine[Any, Any, T]) -> T:
    """Run one load on uvloop: the generator's own overhead is the same for both targets and
    as small as we can make it, since it shares the two cores with the servers."""
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        return runner.run(coro)


def w1_rounds(
    first: str,
    second: str,
    concurrency: int,
    total: int,
    rounds: int,
    headers: dict[str, str] | None = None,
) -> list[tuple[Result, Result]]:
    """W1 against `first` then `second` (with `headers`: an API key, say), `rounds` times after a
    warm-up of each; alternating, so that a slow moment of the shared machine falls on both sides
    of a round, not on one side of the comparison. Raises `RuntimeError` if a request failed."""
    run(w1(first, concurrency, WARM_UP_REQUESTS))
    run(w1(second, concurrency, WARM_UP_REQUESTS, headers=headers))
    pairs = []
    for _ in range(rounds):
        a = run(w1(first, concurrency, total))
        b = run(w1(second, concurrency, total, headers=headers))
        if a.errors or b.errors:
            raise RuntimeError(f"failed requests: {first} {a.errors}, {second} {b.errors}")
        pairs.append((a, b))
    return pairs


def median_round(pairs: list[tuple[Result, Result]]) -> tuple[Result, Result]:
    """The round reported: the one whose second run has the median p50."""
    ordered = sorted(pairs, key=lambda pair: pair[1].p50)
    return ordered[len(ordered) // 2]


def generate_body(tokens: int, stream: bool) -> dict[str, object]:
    return {
        "model": "llama3.2:1b",
        "prompt": "Why is the sky blue? Answer briefly.",
        "stream": stream,
        "options": {"num_predict": tokens},
    }


async def w1(
    base_url: str,
    concurrency: int,
    total: int,
    tokens: int = 64,
    headers: dict[str, str] | None = None,
) -> Result:
    """`total` non-streamed /api/generate requests, `concurrency` at a time, each with
    `headers` (an API key, say)."""
    body = generate_body(tokens, stream=False)
    latencies: list[float] = []
    errors = 0
    remaining = total
    connector = aiohttp.TCPConnector(limit=0)
    async with aiohttp.ClientSession(connector=connector, headers=headers) as session:

        async def worker() -> None:
            nonlocal remaining, errors
            while remaining > 0:
                remaining -= 1
                start = time.perf_counter()
                async with session.post(f"{base_url}/api/generate", json=body) as response:
                    await response.read()
                    if response.status != 200:
                        errors += 1
                latencies.append((time.perf_counter() - start) * 1000.0)

        start = time.perf_counter()
        async with asyncio.timeout(RUN_DEADLINE_S), asyncio.TaskGroup() as group:
            for _ in range(concurrency):
                group.create_task(worker())
        seconds = time.perf_counter() - start
    return Result(len(latencies), errors, seconds, latencies)


async def w2(
    base_url: str,
    streams: int,
    tokens: int = 256,
    tok_per_s: float = 290.0,
    per_stream: int = 3,
    burst: bool = False,
) -> Result:
    """`streams` concurrent streamed /api/generate requests; the TTFB of each (see `streamed`)."""
    ttfb: list[float] = []
    errors = chunks = 0

    async def read(response: aiohttp.ClientResponse, start: float) -> None:
        nonlocal errors, chunks
        first = await response.content.readline()
        ttfb.append((time.perf_counter() - start) * 1000.0)
        if response.status != 200 or not first:
            errors += 1
        chunks += first.count(b"\n")
        async for data in response.content.iter_any():
            chunks += data.count(b"\n")

    seconds = await streamed(base_url, streams, tokens, read, tok_per_s, per_stream, burst)
    return Result(len(ttfb), errors, seconds, ttfb, chunks)


async def streamed(
    base_url: str,
    streams: int,
    tokens: int,
    read: StreamReader,
    tok_per_s: float = 290.0,
    per_stream: int = 3,
    burst: bool = False,
) -> float:
    """The W2 load: `streams` streamed /api/generate requests in flight, each answer given to
    `read`; returns the run's seconds.

    Steady (the default): `streams` workers each run `per_stream` streams back to back, their
    starts spread over one stream's duration (`tokens / tok_per_s`), so that `streams` streams
    are always in flight and requests arrive one by one, as they do in production. Burst: all
    start in the same instant, once (a connection storm: it measures how long the last of them
    waits).
    """
    body = generate_body(tokens, stream=True)
    duration = tokens / tok_per_s
    connector = aiohttp.TCPConnector(limit=0)
    async with aiohttp.ClientSession(connector=connector) as session:

        async def worker(i: int) -> None:
            if not burst:
                await asyncio.sleep(i * duration / streams)
            for _ in range(1 if burst else per_stream):
                start = time.perf_counter()
                async with session.post(f"{base_url}/api/generate", json=body) as response:
                    await read(response, start)

        start = time.perf_counter()
        async with asyncio.timeout(RUN_DEADLINE_S), asyncio.TaskGroup() as group:
            for i in range(streams):
                group.create_task(worker(i))
        return time.perf_counter() - start
