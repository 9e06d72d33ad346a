"""The GPU gate under 64 clients of whom 8 read slowly: do the slow ones delay the fast ones?

Run alone: `.venv/bin/python -m bench.gate_bench [--rounds N]`; `make bench` runs it too.

A simulated GPU with two slots (`parallel=2`, the edge's default `max_inflight=2`) answers every
request after 100 ms of "prefill" and then as fast as it is read. 56 fast clients each make 4
streamed requests of 200 tokens, one after another, and read at full speed; their time to first
byte is mostly their wait in the gate's queue. 8 more clients each ask for an 18,000-token
answer (4.1 MB of SSE: more than the 3-4 MB a loopback connection's kernel buffers take in, so a
slow reader really does hold back the edge's writes). In the baseline round those 8 read at full
speed; in the slow round they read through a 4 KiB receive window at about 200 KB/s, some 20 s
for the answer, and are let go when the fast clients are done. Rounds alternate (baseline, slow,
...) after a warm-up; each kind's samples are pooled over the rounds. The target (issue 4): slow
readers change the fast clients' TTFB p99 by at most 10%. With the seed's relay a slow reader
held its slot until it had read its answer (docs/performance.md has that run too).
"""

from __future__ import annotations

import asyncio
import json
import socket
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import orjson

from bench import cli, load, procs

FAST_CLIENTS = 56
SLOW_CLIENTS = 8
REQUESTS_PER_FAST_CLIENT = 4
FAST_TOKENS = 200
BIG_TOKENS = 18_000  # ~230 bytes a token as SSE: 4.1 MB
PREFILL_S = 0.1  # the simulated GPU's time to first token for every request
FAST_SPREAD_S = 0.5  # fast clients start one by one over this long, not in one instant
SLOW_RECV_BUFFER = 4096  # bytes: the receive window of a client on a poor link
SLOW_READ_BYTES, SLOW_READ_EVERY_S = 4096, 0.02  # about 200 KB/s
TARGET_P99_CHANGE = 0.10


@dataclass
class Round:
    slow: bool
    ttfb_ms: list[float] = field(default_factory=list)  # the fast clients' only
    errors: int = 0
    big_bytes_read: list[int] = field(default_factory=list)  # by each of the 8, by the end
    seconds: float = 0.0

    def result(self) -> load.Result:
        return load.Result(len(self.ttfb_ms), self.errors, self.seconds, self.ttfb_ms)


def body(tokens: int) -> bytes:
    return orjson.dumps(load.generate_body(tokens, stream=True))


# The big answers come as OpenAI SSE: half the tokens (and half the simulator's CPU, which
# shares the two cores with everything else) of the same bytes as NDJSON.
BIG_PATH = "/v1/chat/completions"
BIG_BODY = orjson.dumps(
    {
        "model": "llama3.2:1b",
        "messages": [{"role": "user", "content": "Tell me everything."}],
        "stream": True,
        "max_tokens": BIG_TOKENS,
    }
)


async def fast_client(session: aiohttp.ClientSession, url: str, delay: float, into: Round) -> None:
    await asyncio.sleep(delay)
    for _ in range(REQUESTS_PER_FAST_CLIENT):
        start = time.perf_counter()
        async with session.post(
            f"{url}/api/generate",
            data=body(FAST_TOKENS),
            headers={"Content-Type": "application/json"},
        ) as response:
            first = await response.content.readline()
            into.ttfb_ms.append((time.perf_counter() - start) * 1000.0)
            if response.status != 200 or not first:
                into.errors += 1
            async for _ in response.content.iter_any():
                pass


async def quick_big_reader(session: aiohttp.ClientSession, url: str, into: Round) -> None:
    read = 0
    try:
        async with session.post(
            f"{url}{BIG_PATH}", data=BIG_BODY, headers={"Content-Type": "application/json"}
        ) as response:
            async for chunk in response.content.iter_any():
                read += len(chunk)
    finally:
        into.big_bytes_read.append(read)


async def slow_big_reader(url: str, into: Round) -> None:
    """One HTTP/1.1 request on a socket with a small receive window, read at ~200 KB/s."""
    host, port = url.removeprefix("http://").split(":")
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, SLOW_RECV_BUFFER)
    sock.setblocking(False)
    await asyncio.get_running_loop().sock_connect(sock, (host, int(port)))
    reader, writer = await asyncio.open_connection(sock=sock, limit=SLOW_READ_BYTES)
    payload = BIG_BODY
    writer.write(
        f"POST {BIG_PATH} HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(payload)}\r\n\r\n".encode()
        + payload
    )
    read = 0
    try:
        while data := await reader.read(SLOW_READ_BYTES):
            read += len(data)
            await asyncio.sleep(SLOW_READ_EVERY_S)
    finally:
        into.big_bytes_read.append(read)
        writer.transport.abort()


async def one_round(url: str, slow: bool) -> Round:
    """Every client at once; the 8 big readers are let go when the fast clients are done."""
    into = Round(slow)
    connector = aiohttp.TCPConnector(limit=0)
    async with aiohttp.ClientSession(connector=connector) as session:
        start = time.perf_counter()
        async with asyncio.timeout(load.RUN_DEADLINE_S), asyncio.TaskGroup() as group:
            big = [
                group.create_task(
                    slow_big_reader(url, into) if slow else quick_big_reader(session, url, into)
                )
                for _ in range(SLOW_CLIENTS)
            ]
            async with asyncio.TaskGroup() as fast:
                for i in range(FAST_CLIENTS):
                    delay = i * FAST_SPREAD_S / FAST_CLIENTS
                    fast.create_task(fast_client(session, url, delay, into))
            into.seconds = time.perf_counter() - start
            for task in big:
                task.cancel()  # a slow reader is still reading: it has had its chance
    return into


def gate_pair(url: str, rounds: int) -> dict[str, Any]:
    """Alternate baseline and slow rounds; pool each kind's TTFB samples over the rounds."""
    load.run(one_round(url, slow=False))  # warm-up: connections, caches
    pairs: list[tuple[Round, Round]] = []
    for _ in range(rounds):
        pairs.append((load.run(one_round(url, slow=False)), load.run(one_round(url, slow=True))))
    # Refusals (503 overloaded after queue_timeout) are figures here, not a crash: with a relay
    # that lets slow readers hold slots, they are the result.
    refused = [sum(base.errors for base, _ in pairs), sum(slow.errors for _, slow in pairs)]
    b = load.Result(0, 0, 1, [ms for base, _ in pairs for ms in base.ttfb_ms])
    s = load.Result(0, 0, 1, [ms for _, slow in pairs for ms in slow.ttfb_ms])
    read = [n for _, slow in pairs for n in slow.big_bytes_read]
    return {
        "clients": FAST_CLIENTS + SLOW_CLIENTS,
        "slow_clients": SLOW_CLIENTS,
        "rounds": rounds,
        "fast_requests": len(b.latencies_ms),
        "baseline": {"ttfb_p50_ms": b.p50, "ttfb_p99_ms": b.p99},
        "with_slow": {"ttfb_p50_ms": s.p50, "ttfb_p99_ms": s.p99},
        "p99_change": s.p99 / b.p99 - 1.0,
        "round_seconds": [[round(x.seconds, 1), round(y.seconds, 1)] for x, y in pairs],
        "round_p99_change": [round(y.result().p99 / x.result().p99 - 1.0, 4) for x, y in pairs],
        "answer_mb": round(max(n for base, _ in pairs for n in base.big_bytes_read) / 1e6, 1),
        "slow_read_mb_by_end": [round(min(read) / 1e6, 1), round(max(read) / 1e6, 1)],
        "fast_refused": {"baseline": refused[0], "with_slow": refused[1]},
        "target_met": abs(s.p99 / b.p99 - 1.0) <= TARGET_P99_CHANGE and not any(refused),
    }


def run(telemetry: Path, rounds: int) -> dict[str, Any]:
    """Start a two-slot simulator and a default edge, run the rounds, print the figures."""
    with (
        procs.simulator(parallel=2, ttft=PREFILL_S, reply_tokens=BIG_TOKENS) as sim,
        # Defaults (max_inflight 2, queue_max 64, stream_buffer_bytes 8 MiB), but answers of
        # BIG_TOKENS allowed; auth off, as in the other runs.
        procs.edge(sim, telemetry, max_output_tokens=str(BIG_TOKENS), auth="none") as edge,
    ):
        result = gate_pair(edge, rounds)
    print_gate(result)
    return result


def print_gate(r: dict[str, Any]) -> None:
    b, s = r["baseline"], r["with_slow"]
    print(
        f"Gate {r['clients']} clients ({r['slow_clients']} read {r['answer_mb']} MB at ~200 KB/s):"
        f" fast TTFB p50 {b['ttfb_p50_ms']:.0f} -> {s['ttfb_p50_ms']:.0f} ms, p99 "
        f"{b['ttfb_p99_ms']:.0f} -> {s['ttfb_p99_ms']:.0f} ms ({r['p99_change']:+.1%}; target "
        f"<= 10%) | refused {r['fast_refused']['baseline']} -> {r['fast_refused']['with_slow']}"
        f" | slow readers had read {r['slow_read_mb_by_end'][0]}-"
        f"{r['slow_read_mb_by_end'][1]} MB when the fast ones were done"
    )


def main() -> None:
    args = cli.parser(__doc__).parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        result = run(Path(tmp) / "gate.jsonl", args.rounds)
    if args.json:
        print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
