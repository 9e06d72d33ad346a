"""`python -m bench.pool_bench`: what a pool of workstations costs and gives (issue 11).

Routing: the decision the request path makes for every inference request (`Pool.candidates`,
`Pool.picker`, the gate's `acquire` and `release`), timed one by one in this process on a pool
of 16 agents (six models, a third of the slots held, a speed known for half, affinity for half
the conversations) and on a pool of one, measured in the same run. Target: p99 <= 50 µs.
W1 c=1: non-streamed /api/generate through an edge with two upstreams (unpaced simulators) and
through an edge with the one `upstream`, alternating, `--rounds` rounds; the round with the
median pool p50 is reported (`--requests` a run, 64 tokens). Target: the pool adds <= 0.1 ms
at p50. One at a time, the pool sends every request to the same agent, as it should: the same
prompt is one conversation (affinity), and that agent has the model loaded.
Aggregate: 16 streaming clients for `--seconds` against two simulators decoding 2 at a time at
50 tok/s behind a pool of two (2 slots each), and against one of them alone behind a pool of
one; tokens received a second, counted from the NDJSON lines. Target: >= 1.8x.
Every server is a process of its own on 127.0.0.1; the load is generated here.
"""

from __future__ import annotations

import asyncio
import json
import statistics
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any

import aiohttp

from bench import cli, load, procs
from edge.models import canonical_model
from edge.settings import EdgeSettings, UpstreamSettings
from edge.upstreams.agent import Agent
from edge.upstreams.base import State
from edge.upstreams.gate import Pick
from edge.upstreams.pool import Pool, build_pool
from shared.logging import configure_logging

DECISIONS = 20_000
MODELS = tuple(
    canonical_model(name)
    for name in ("llama3.2:1b", "qwen2.5:0.5b", "nomic-embed-text", "phi3", "gemma2:2b", "mistral")
)
CLIENT = "127.0.0.1"  # the gate's key for an anonymous caller
STREAM_TOKENS = 64  # 1.28 s a stream at 50 tok/s: several per client in a run
DECODE_TOK_PER_S = 50.0
DECODE_PARALLEL = 2


# Routing decisions, in process.


def _pool(size: int, state_dir: Path) -> Pool:
    upstreams = [
        UpstreamSettings(name=f"ws{i}", url=f"http://127.0.0.1:{20000 + i}", max_inflight=2)
        for i in range(size)
    ]
    settings = EdgeSettings(
        upstreams=upstreams, telemetry_path=None, auth="none", state_dir=state_dir
    )
    pool = build_pool(settings)
    for i, agent in enumerate(pool.agents.values()):
        agent.monitor.set_agent_present(True)
        agent.monitor.report(State.UP, "bench")
        served = MODELS if size == 1 else [MODELS[(i + k) % len(MODELS)] for k in range(3)]
        agent.models = frozenset(served)
        agent.loaded = frozenset(served[:1])
        agent.looked = True  # as after its first look at the models
        agent.s_per_token = 1.0 / (30 + i) if i % 2 == 0 else None
        if not agent.healthy:
            raise RuntimeError(f"{agent!r} is not healthy: what the pool needs has changed")
    for j in range(32):
        pool.affinity.put(f"conversation-{j}", f"ws{j % size}")
    return pool


def _only(agent: Agent) -> Pick:
    return lambda: agent


async def _hold_some(pool: Pool) -> None:
    """One slot held on every fourth agent, so that picks compare unequal loads."""
    for i, agent in enumerate(pool.agents.values()):
        if i % 4 == 0:
            await pool.gate.acquire("holder", None, _only(agent))


async def _decide(pool: Pool, n: int) -> dict[str, float]:
    await _hold_some(pool)
    took_ns: list[int] = []
    chosen: Counter[str] = Counter()
    cpu = time.process_time()
    for k in range(n):
        model = MODELS[k % len(MODELS)]
        conversation = f"conversation-{k % 64}"
        start = time.perf_counter_ns()
        candidates = pool.candidates(model)
        slot = await pool.gate.acquire(CLIENT, None, pool.picker(candidates, model, conversation))
        slot.release()
        took_ns.append(time.perf_counter_ns() - start)
        chosen[getattr(slot.seat, "name", "?")] += 1
    cpu_us = (time.process_time() - cpu) / n * 1e6
    took_ns.sort()
    return {
        "agents": len(pool.agents),
        "decisions": n,
        "p50_us": took_ns[n // 2] / 1000,
        "p99_us": took_ns[min(n - 1, round(0.99 * (n - 1)))] / 1000,
        "max_us": took_ns[-1] / 1000,
        "cpu_us_per_decision": cpu_us,
        "agents_chosen": len(chosen),
    }


async def _routing(n: int) -> dict[str, Any]:
    with tempfile.TemporaryDirectory() as tmp:
        one = await _decide(_pool(1, Path(tmp)), n)
        sixteen = await _decide(_pool(16, Path(tmp)), n)
    return {"pool_of_1": one, "pool_of_16": sixteen}


# W1 c=1 through the edge.


def _upstreams(*urls: str, max_inflight: int | None = None) -> str:
    return json.dumps(
        [{"name": f"ws{i}", "url": url, "max_inflight": max_inflight} for i, url in enumerate(urls)]
    )


def _agents(telemetry: Path) -> dict[str, int]:
    """Requests each agent took, from an edge's telemetry: is the work shared? (A stream cut
    by the end of a run while it waited in the gate's queue had no agent: not counted.)"""
    counts: Counter[str] = Counter()
    for line in telemetry.read_bytes().splitlines():
        record = json.loads(line)
        if record.get("route") == "/api/generate" and record.get("agent"):
            counts[record["agent"]] += 1
    return dict(sorted(counts.items()))


def _w1(tmp: Path, requests: int, rounds: int) -> dict[str, Any]:
    one_log, two_log = tmp / "w1-single.jsonl", tmp / "w1-pool.jsonl"
    with (
        procs.simulator() as a,
        procs.simulator() as b,
        procs.edge(a, one_log, log_level="warning") as single,
        procs.edge(a, two_log, upstreams=_upstreams(a, b), log_level="warning") as pool,
    ):
        pairs = load.w1_rounds(single, pool, 1, requests, rounds)
    one, two = load.median_round(pairs)
    return {
        "requests": requests,
        "single": one.w1_figures(),
        "pool_of_2": two.w1_figures(),
        "added_p50_ms": two.p50 - one.p50,
        "added_p99_ms": two.p99 - one.p99,
        "pool_requests_per_agent": _agents(two_log),
    }


# Aggregate decode rate.


async def _tokens(base_url: str, clients: int, seconds: float) -> tuple[int, int]:
    """Tokens received (NDJSON lines before `done`) by `clients` streaming back to back for
    `seconds`, and the failed requests; streams still running at the end are cut there."""
    body = load.generate_body(STREAM_TOKENS, stream=True)
    received = 0
    failed = 0

    async def client(session: aiohttp.ClientSession) -> None:
        nonlocal received, failed
        while True:
            async with session.post(f"{base_url}/api/generate", json=body) as response:
                if response.status != 200:
                    failed += 1
                    await response.read()
                    continue
                async for line in response.content:
                    if line.strip() and b'"done":true' not in line:
                        received += 1

    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as session:
        try:
            async with asyncio.timeout(seconds), asyncio.TaskGroup() as group:
                for _ in range(clients):
                    group.create_task(client(session))
        except TimeoutError:
            pass
    return received, failed


def _aggregate(tmp: Path, seconds: float, rounds: int, clients: int = 16) -> dict[str, Any]:
    one_log, two_log = tmp / "tok-single.jsonl", tmp / "tok-pool.jsonl"
    slots = DECODE_PARALLEL
    rates: dict[str, list[float]] = {"single": [], "pool_of_2": []}
    with (
        procs.simulator(DECODE_TOK_PER_S, DECODE_PARALLEL) as a,
        procs.simulator(DECODE_TOK_PER_S, DECODE_PARALLEL) as b,
        procs.edge(a, one_log, upstreams=_upstreams(a, max_inflight=slots)) as single,
        procs.edge(a, two_log, upstreams=_upstreams(a, b, max_inflight=slots)) as pool,
    ):
        for _ in range(rounds):
            for name, url in (("single", single), ("pool_of_2", pool)):
                tokens, failed = load.run(_tokens(url, clients, seconds))
                if failed:
                    raise RuntimeError(f"{failed} streams failed through {name} ({url})")
                rates[name].append(tokens / seconds)
    one, two = statistics.median(rates["single"]), statistics.median(rates["pool_of_2"])
    return {
        "clients": clients,
        "seconds": seconds,
        "tok_per_s_per_slot": DECODE_TOK_PER_S,
        "single_tok_per_s": one,
        "pool_of_2_tok_per_s": two,
        "ratio": two / one,
        "pool_requests_per_agent": _agents(two_log),
    }


def main() -> None:
    parser = cli.parser(__doc__, rounds=3, requests=300)
    parser.add_argument("--decisions", type=int, default=DECISIONS)
    parser.add_argument("--seconds", type=float, default=6.0, help="each aggregate run")
    args = parser.parse_args()
    configure_logging("warning")
    results: dict[str, Any] = {"routing": load.run(_routing(args.decisions))}
    for r in results["routing"].values():
        print(
            f"routing, pool of {r['agents']:<2}: p50 {r['p50_us']:6.1f} µs p99 {r['p99_us']:6.1f} "
            f"µs max {r['max_us']:7.1f} µs | CPU {r['cpu_us_per_decision']:5.1f} µs a decision"
        )
    with tempfile.TemporaryDirectory() as tmp:
        w1 = results["w1_c1"] = _w1(Path(tmp), args.requests, args.rounds)
        print(
            f"W1 c=1 single {load.w1_text(w1['single'])} | pool of 2 "
            f"{load.w1_text(w1['pool_of_2'])} | added p50 {w1['added_p50_ms']:+.3f} ms "
            f"p99 {w1['added_p99_ms']:+.3f} ms | per agent {w1['pool_requests_per_agent']}"
        )
        agg = results["aggregate"] = _aggregate(Path(tmp), args.seconds, max(1, args.rounds - 1))
        print(
            f"{agg['clients']} streams, 2 slots @{DECODE_TOK_PER_S:g} tok/s an agent: single "
            f"{agg['single_tok_per_s']:.0f} tok/s | pool of 2 {agg['pool_of_2_tok_per_s']:.0f} "
            f"tok/s | ratio {agg['ratio']:.2f}x | per agent {agg['pool_requests_per_agent']}"
        )
    if args.json:
        print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
