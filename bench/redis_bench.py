"""`python -m bench.redis_bench`: what sharing limits through Redis costs and keeps (issue 12).

Every edge here has `auth=keys` and a key with rpm and tpm, so the limiter runs on every
request (with `redis_url`: the GCRA script, the GPU-gate lease and the tpm charge), against one
unpaced simulator and a `redis-server` started here (no persistence, a free loopback port).

Latency: W1 c=1 (non-streamed /api/generate, 64 tokens) through an edge with `redis_url` and an
edge without it, alternating, `--rounds` rounds of `--requests` after a warm-up; the added p50 is
the median of the rounds' paired differences, the figures shown are the median round's, and the
edges' CPU (utime + stime from /proc) is divided by the requests each served. Target: <= 0.3 ms.
Overshoot: three edges share the Redis and one key limited to `OVERSHOOT_RPM`; 16 clients on each
edge send `--hammer` requests in all at once. allowed = the limit (the burst GCRA grants at once)
+ its refill during the run (limit / 60 a second); overshoot = (200s - allowed) / allowed.
Target: <= 1 %.
Blackhole: W1 c=1 through one Redis-backed edge while the redis-server is stopped with SIGSTOP
(it keeps its connections and answers nothing), then continued; a poller on /readyz times the
breaker. Every request must complete without a 5xx, and none may wait on Redis past its
timeout (`BACKHAUL_EDGE_REDIS_TIMEOUT`, 50 ms) until the breaker opens, then not at all.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import signal
import statistics
import tempfile
import time
from collections import Counter
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp

from bench import cli, load, procs
from bench.cpu import cpu_seconds
from edge.policy.keys import ApiKey, KeysFile, digest, new_secret, write_keys_file

REDIS_SERVER = shutil.which("redis-server") or "/usr/bin/redis-server"
TARGET_ADDED_P50_MS = 0.3
TARGET_OVERSHOOT = 0.01
REDIS_TIMEOUT_MS = 50.0  # the edge's default `redis_timeout`
# Limits checked and charged on every request that never refuse one in a run.
_RPM = 10_000_000
_TPM = 10_000_000_000
# Large enough that the run is mostly decided by Redis, small enough to pass in a second.
OVERSHOOT_RPM = 600
EDGE_SETTINGS = {"max_inflight": "64", "queue_max": "4096", "log_level": "warning"}
BUSY_CONCURRENCY = 32
CLIENT_TIMEOUT = aiohttp.ClientTimeout(total=10)  # a hung request shows as an error, not a stall


@contextmanager
def redis_server(tmp: Path) -> Iterator[tuple[str, int]]:
    """Debian's redis-server on a free loopback port, no persistence: its URL and pid."""
    tmp.mkdir(exist_ok=True)
    port = procs.free_port()
    args = [
        REDIS_SERVER, "--port", str(port), "--bind", "127.0.0.1", "--save", "",
        "--appendonly", "no", "--dir", str(tmp), "--protected-mode", "yes",
    ]  # fmt: skip
    with procs.process(args, port, log=tmp / "redis.log") as pid:
        yield f"redis://127.0.0.1:{port}/0", pid


@contextmanager
def frozen(pid: int) -> Iterator[None]:
    """The process stopped (a blackhole: it accepts and answers nothing) until the block ends."""
    os.kill(pid, signal.SIGSTOP)
    try:
        yield
    finally:
        os.kill(pid, signal.SIGCONT)


def write_key(path: Path, rpm: int, tpm: int | None) -> dict[str, str]:
    """A keys file with one key; the Authorization header that uses it."""
    secret = new_secret()
    write_keys_file(
        path, KeysFile(keys=[ApiKey(name="bench", hash=digest(secret), rpm=rpm, tpm=tpm)])
    )
    return {"Authorization": f"Bearer {secret}"}


def limiters(*telemetry: Path, by_status: bool = False) -> dict[str, int]:
    """Inference requests by who decided their limits ("redis" or "local"), from telemetry;
    `by_status`: by status, error type and limiter ("503 agent_unavailable local")."""
    counts: Counter[str] = Counter()
    for path in telemetry:
        for line in path.read_bytes().splitlines():
            record = json.loads(line)
            if record.get("route") != "/api/generate":
                continue
            limiter = str(record.get("limiter"))
            if by_status:
                kind = record.get("type") or ""
                limiter = " ".join(str(x) for x in (record.get("status"), kind, limiter) if x)
            counts[limiter] += 1
    return dict(sorted(counts.items()))


# Latency: an edge with Redis vs one without.


def latency(tmp: Path, redis_url: str, requests: int, rounds: int) -> dict[str, Any]:
    auth = write_key(tmp / "keys.json", _RPM, _TPM)
    keyed = {"auth": "keys", "keys_path": str(tmp / "keys.json"), **EDGE_SETTINGS}
    shared_log = tmp / "w1-redis.jsonl"
    with (
        procs.simulator() as sim,
        procs.edge(sim, tmp / "w1-alone.jsonl", **keyed) as alone,
        procs.edge(sim, shared_log, redis_url=redis_url, edge_id="bench-w1", **keyed) as shared,
    ):
        pids = (procs.PIDS[alone], procs.PIDS[shared])
        for url in (alone, shared):
            load.run(load.w1(url, 1, 50, headers=auth))  # warm-up: connections, the script
        pairs: list[tuple[load.Result, load.Result]] = []
        cpu = [0.0, 0.0]
        for _ in range(rounds):
            runs = []
            for i, url in enumerate((alone, shared)):
                before = cpu_seconds(pids[i])
                runs.append(load.run(load.w1(url, 1, requests, headers=auth)))
                cpu[i] += cpu_seconds(pids[i]) - before
            if runs[0].errors or runs[1].errors:
                raise RuntimeError(
                    f"failed requests: alone {runs[0].errors}, redis {runs[1].errors}"
                )
            pairs.append((runs[0], runs[1]))
        # Under load the writes behind requests share their round trips (RedisLink.later):
        # the CPU a request at c=32, alone vs with Redis, over as many requests.
        busy = [0.0, 0.0]
        for i, url in enumerate((alone, shared)):
            before = cpu_seconds(pids[i])
            run = load.run(load.w1(url, BUSY_CONCURRENCY, requests * rounds, headers=auth))
            if run.errors:
                raise RuntimeError(f"c={BUSY_CONCURRENCY}: {run.errors} failed requests")
            busy[i] = cpu_seconds(pids[i]) - before
    o, r = load.median_round(pairs)
    served = requests * rounds
    return {
        "requests": requests,
        "rounds": rounds,
        "alone": o.w1_figures(),
        "redis": r.w1_figures(),
        "added_p50_ms": statistics.median(b.p50 - a.p50 for a, b in pairs),
        "added_p99_ms": statistics.median(b.p99 - a.p99 for a, b in pairs),
        "added_p50_each_round_ms": [b.p50 - a.p50 for a, b in pairs],
        "edge_cpu_us_per_request": {"alone": cpu[0] / served * 1e6, "redis": cpu[1] / served * 1e6},
        "edge_cpu_us_per_request_busy": {
            "alone": busy[0] / served * 1e6,
            "redis": busy[1] / served * 1e6,
        },
        "limiter": limiters(shared_log),
    }


# Overshoot: three edges, one key, one limit.


async def hammer(
    urls: list[str], headers: dict[str, str], total: int, clients: int
) -> tuple[Counter[int], float]:
    """`total` requests shared out over `urls`, `clients` at a time on each: statuses, seconds."""
    statuses: Counter[int] = Counter()
    remaining = dict.fromkeys(urls, total // len(urls))
    body = load.generate_body(64, stream=False)
    connector = aiohttp.TCPConnector(limit=0)
    async with aiohttp.ClientSession(
        connector=connector, headers=headers, timeout=CLIENT_TIMEOUT
    ) as session:

        async def client(url: str) -> None:
            while remaining[url] > 0:
                remaining[url] -= 1
                async with session.post(f"{url}/api/generate", json=body) as response:
                    await response.read()
                    statuses[response.status] += 1

        start = time.perf_counter()
        async with asyncio.timeout(load.RUN_DEADLINE_S), asyncio.TaskGroup() as group:
            for url in urls:
                for _ in range(clients):
                    group.create_task(client(url))
        return statuses, time.perf_counter() - start


def overshoot(tmp: Path, redis_url: str, total: int, clients: int) -> dict[str, Any]:
    auth = write_key(tmp / "keys-rpm.json", OVERSHOOT_RPM, None)
    keyed = {"auth": "keys", "keys_path": str(tmp / "keys-rpm.json"), **EDGE_SETTINGS}
    logs = [tmp / f"rpm-{name}.jsonl" for name in "abc"]
    with procs.simulator() as sim, shared_edges(sim, logs, redis_url, keyed) as urls:
        statuses, seconds = load.run(hammer(urls, auth, total, clients))
    served = statuses.get(200, 0)
    allowed = OVERSHOOT_RPM + OVERSHOOT_RPM / 60.0 * seconds
    return {
        "edges": len(urls),
        "clients": clients * len(urls),
        "requests": sum(statuses.values()),
        "rpm": OVERSHOOT_RPM,
        "seconds": seconds,
        "statuses": {str(k): v for k, v in sorted(statuses.items())},
        "allowed": allowed,
        "served": served,
        "overshoot": (served - allowed) / allowed,
        "edges_said": limiters(*logs, by_status=True),
    }


@contextmanager
def shared_edges(
    sim: str, logs: list[Path], redis_url: str, settings: dict[str, str]
) -> Iterator[list[str]]:
    """One Redis-backed edge per telemetry file in `logs`, all in front of `sim`."""
    with ExitStack() as stack:
        yield [
            stack.enter_context(
                procs.edge(sim, log, redis_url=redis_url, edge_id=f"bench-{log.stem}", **settings)
            )
            for log in logs
        ]


# Blackhole: Redis stops answering mid-run.


@dataclass(frozen=True)
class Sample:
    id: str
    start_s: float
    ms: float
    status: int  # 0: no answer at all (the client's error or timeout)


@dataclass
class Blackhole:
    """When each thing happened, in seconds from the run's start (the watcher's view)."""

    frozen_s: float = float("inf")
    opened_s: float = float("inf")  # /readyz first said redis "down"
    thawed_s: float = float("inf")
    closed_s: float = float("inf")  # then "up" again

    def phase(self, start_s: float) -> str:
        if start_s < self.frozen_s:
            return "before"
        if start_s < self.opened_s:
            return "frozen_breaker_closed"
        if start_s < self.thawed_s:
            return "frozen_breaker_open"
        return "after"


async def watch(session: aiohttp.ClientSession, url: str, t0: float, times: Blackhole) -> None:
    """Poll /readyz every 20 ms: when the breaker opened and closed again."""
    while True:
        try:
            async with session.get(f"{url}/readyz") as response:
                redis = (await response.json()).get("redis")
        except (aiohttp.ClientError, TimeoutError, ValueError):
            redis = None
        now = time.perf_counter() - t0
        if redis == "down" and times.opened_s == float("inf"):
            times.opened_s = now
        if redis == "up" and now > times.thawed_s and times.closed_s == float("inf"):
            times.closed_s = now
        await asyncio.sleep(0.02)


async def w1_through_blackhole(
    url: str, headers: dict[str, str], redis_pid: int, before_s: float, frozen_s: float
) -> tuple[list[Sample], Blackhole]:
    """W1 c=1 for `before_s`, then `frozen_s` with Redis stopped, then as long again after."""
    body = load.generate_body(64, stream=False)
    samples: list[Sample] = []
    times = Blackhole()
    stack = ExitStack()
    async with aiohttp.ClientSession(headers=headers, timeout=CLIENT_TIMEOUT) as session:
        t0 = time.perf_counter()
        watcher = asyncio.create_task(watch(session, url, t0, times))
        try:
            while (now := time.perf_counter() - t0) < before_s + 2 * frozen_s:
                if times.frozen_s == float("inf") and now >= before_s:
                    stack.enter_context(frozen(redis_pid))
                    times.frozen_s = now
                elif times.thawed_s == float("inf") and now >= before_s + frozen_s:
                    stack.close()
                    times.thawed_s = now
                samples.append(await _one(session, url, body, f"bh-{len(samples)}", t0))
        finally:
            stack.close()
            watcher.cancel()
            await asyncio.gather(watcher, return_exceptions=True)
    return samples, times


async def _one(
    session: aiohttp.ClientSession, url: str, body: dict[str, object], rid: str, t0: float
) -> Sample:
    start = time.perf_counter()
    try:
        async with session.post(
            f"{url}/api/generate", json=body, headers={"X-Request-Id": rid}
        ) as response:
            await response.read()
            status = response.status
    except (aiohttp.ClientError, TimeoutError):
        status = 0
    return Sample(rid, start - t0, (time.perf_counter() - start) * 1000.0, status)


def blackhole(tmp: Path, before_s: float, frozen_s: float) -> dict[str, Any]:
    auth = write_key(tmp / "keys-bh.json", _RPM, _TPM)
    keyed = {"auth": "keys", "keys_path": str(tmp / "keys-bh.json"), **EDGE_SETTINGS}
    log = tmp / "blackhole.jsonl"
    with (
        redis_server(tmp / "redis-bh") as (redis_url, redis_pid),
        procs.simulator() as sim,
        procs.edge(sim, log, redis_url=redis_url, edge_id="bench-bh", **keyed) as url,
    ):
        load.run(load.w1(url, 1, 50, headers=auth))  # warm-up
        samples, times = load.run(w1_through_blackhole(url, auth, redis_pid, before_s, frozen_s))
    decided = {}
    for line in log.read_bytes().splitlines():
        record = json.loads(line)
        decided[record["id"]] = str(record.get("limiter"))
    baseline = statistics.median(s.ms for s in samples if times.phase(s.start_s) == "before")
    phases: dict[str, Any] = {}
    for name in ("before", "frozen_breaker_closed", "frozen_breaker_open", "after"):
        taken = [s for s in samples if times.phase(s.start_s) == name]
        if taken:
            phases[name] = _phase(taken, baseline, decided)
    return {
        "frozen_at_s": times.frozen_s,
        "breaker_open_after_s": times.opened_s - times.frozen_s,
        "thawed_at_s": times.thawed_s,
        "breaker_closed_after_s": times.closed_s - times.thawed_s,
        "baseline_p50_ms": baseline,
        "phases": phases,
    }


def _phase(samples: list[Sample], baseline: float, decided: dict[str, str]) -> dict[str, Any]:
    result = load.Result(len(samples), 0, 1.0, [s.ms for s in samples])
    worst = max(result.latencies_ms)
    return {
        "requests": len(samples),
        "statuses": dict(Counter(str(s.status) for s in samples)),
        "limiter": dict(Counter(decided.get(s.id, "unlogged") for s in samples)),
        "p50_ms": result.p50,
        "p99_ms": result.p99,
        "max_ms": worst,
        "max_added_ms": worst - baseline,
        # Paid at least half of one Redis timeout more than a usual request.
        "waited_on_redis": sum(1 for s in samples if s.ms > baseline + REDIS_TIMEOUT_MS / 2),
    }


# The report.


def main() -> None:
    parser = cli.parser(__doc__, rounds=4, requests=200)
    parser.add_argument("--hammer", type=int, default=3000, help="overshoot: requests in all")
    parser.add_argument("--clients", type=int, default=16, help="overshoot: clients an edge")
    parser.add_argument("--frozen", type=float, default=3.0, help="blackhole: seconds stopped")
    args = parser.parse_args()
    if not Path(REDIS_SERVER).exists():
        raise SystemExit("needs redis-server: apt-get install redis-server")
    results: dict[str, Any] = {}
    with tempfile.TemporaryDirectory() as tmp_dir:
        tmp = Path(tmp_dir)
        with redis_server(tmp) as (redis_url, _):
            w1 = results["w1_c1"] = latency(tmp, redis_url, args.requests, args.rounds)
            _print_latency(w1)
            over = results["overshoot"] = overshoot(tmp, redis_url, args.hammer, args.clients)
            _print_overshoot(over)
        hole = results["blackhole"] = blackhole(tmp, 2.0, args.frozen)
        _print_blackhole(hole)
    if args.json:
        print(json.dumps(results, indent=2))


def _print_latency(r: dict[str, Any]) -> None:
    verdict = "ok" if r["added_p50_ms"] <= TARGET_ADDED_P50_MS else "OVER TARGET"
    cpu = r["edge_cpu_us_per_request"]
    print(
        f"W1 c=1 keyed, alone {load.w1_text(r['alone'])} | redis {load.w1_text(r['redis'])} | "
        f"added p50 {r['added_p50_ms']:+.3f} ms p99 {r['added_p99_ms']:+.2f} ms ({verdict}: "
        f"target <= {TARGET_ADDED_P50_MS} ms) | edge CPU {cpu['alone']:.0f} vs {cpu['redis']:.0f} "
        f"µs a request | limiter {r['limiter']}"
    )
    busy = r["edge_cpu_us_per_request_busy"]
    print(
        f"W1 c={BUSY_CONCURRENCY} keyed: edge CPU {busy['alone']:.0f} vs {busy['redis']:.0f} µs a "
        f"request (alone vs with Redis: {busy['redis'] - busy['alone']:+.0f})"
    )


def _print_overshoot(r: dict[str, Any]) -> None:
    verdict = "ok" if r["overshoot"] <= TARGET_OVERSHOOT else "OVER TARGET"
    print(
        f"overshoot: {r['edges']} edges, {r['clients']} clients, {r['requests']} requests in "
        f"{r['seconds']:.2f} s on one key at {r['rpm']} rpm: statuses {r['statuses']} | allowed "
        f"{r['allowed']:.1f} served {r['served']} | overshoot {r['overshoot']:+.2%} ({verdict}: "
        f"target <= {TARGET_OVERSHOOT:.0%}) | the edges' telemetry: {r['edges_said']}"
    )


def _print_blackhole(r: dict[str, Any]) -> None:
    print(
        f"blackhole: breaker open {r['breaker_open_after_s'] * 1000:.0f} ms after SIGSTOP, "
        f"closed {r['breaker_closed_after_s'] * 1000:.0f} ms after SIGCONT; "
        f"usual p50 {r['baseline_p50_ms']:.2f} ms"
    )
    for name, p in r["phases"].items():
        print(
            f"  {name:<22} {p['requests']:5} requests, p50 {p['p50_ms']:6.2f} p99 "
            f"{p['p99_ms']:6.2f} max {p['max_ms']:7.2f} ms (added {p['max_added_ms']:+.1f}) | "
            f"waited on Redis {p['waited_on_redis']} | statuses {p['statuses']} | "
            f"limiter {p['limiter']}"
        )


if __name__ == "__main__":
    main()
