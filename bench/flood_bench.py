"""No anonymous take-down (issue 8), measured: a normal client's latency while one address tries
to hold thousands of connections to the edge's HTTP port, or to its embedded SSH port.

Run: `.venv/bin/python -m bench.flood_bench` (about 45 s; `--requests`, `--rounds`,
`--connections`, `--rate`, `--json`). Every server is a process of its own on 127.0.0.1: the
simulator at full speed, the edge with its embedded SSH server on and its default caps, and the
agent, logged in, forwarding to the simulator. The normal client (this process, from 127.0.0.1)
makes `--requests` sequential non-streamed /api/generate requests (64 tokens) through edge ->
tunnel -> agent -> simulator, twice: on one keep-alive connection, and on a new connection each
(which a flood at accept would delay). Three conditions in turn: no flood;
`tests.support.flood.Flood` from 127.0.0.2 trying to hold `--connections` idle connections to
the HTTP port, reopening each one the edge closes at once (or at most `--rate` a second); the
same against the SSH port (connections that never authenticate). Each flood runs until the edge
has refused `--connections` of it before the client starts, so the client meets it in its steady
state.
`--rounds` rounds of the three; each condition's samples are pooled over the rounds.

Printed per condition: the client's p50/p99 and their ratio to no flood; the connections the
attacker started and the edge refused (its `backhaul_connections_refused_total`); the edge's
descriptors; the edge's CPU time (utime + stime from /proc/<pid>/stat) per connection it refused,
over `ALONE_S` of each flood with the client idle, and over the client's runs (its requests'
own CPU included). No pass/fail. The attacker shares this machine's two cores with everything
else (a real one spends its own CPU), so the latency ratios here are the pessimistic side.
"""

from __future__ import annotations

import argparse
import asyncio
import getpass
import json
import os
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import aiohttp
from prometheus_client.parser import text_string_to_metric_families

from bench import cli, load, procs
from bench.cpu import user_system
from bench.tunnel_bench import write_key
from tests.support import flood

AGENT = str(procs.BIN / "backhaul-agent")
EDGE = str(procs.BIN / "backhaul-edge")
# Seconds a flood gets to reach its steady state (the edge refusing it) before the client runs.
SETTLE_DEADLINE_S = 20.0
# Seconds of each flood with the client idle: the edge's CPU per refused connection, alone.
ALONE_S = 1.0


@dataclass(frozen=True)
class Stack:
    url: str  # the edge's HTTP port
    ssh_port: int
    edge_pid: int


@contextmanager
def stack(tmp: Path) -> Iterator[Stack]:
    """Simulator, edge (embedded SSH server on) and agent, each a process; yields once the
    agent's forward is bound and the edge is ready."""
    agent_pub = write_key(tmp / "agent_key")
    (tmp / "agent_keys").write_text(agent_pub + "\n")
    host_pub = write_key(tmp / "edge_host_key")
    port, ssh_port, bind = procs.free_port(), procs.free_port(), procs.free_port()
    (tmp / "known_hosts").write_text(f"[127.0.0.1]:{ssh_port} {host_pub}\n")
    edge = {
        "port": str(port),
        "upstream": f"http://127.0.0.1:{bind}",
        "ssh_port": str(ssh_port),
        "ssh_host_key": str(tmp / "edge_host_key"),
        "agent_keys": str(tmp / "agent_keys"),
        "state_dir": str(tmp),
        "telemetry_path": str(tmp / "telemetry.jsonl"),
        "keys_path": str(tmp / "keys.json"),
        "bans_path": str(tmp / "bans.json"),
        "auth": "none",
        "log_format": "json",
        "log_level": "warning",
    }
    (tmp / "agent").mkdir()
    agent = {
        "ssh_port": str(ssh_port),
        "ssh_user": getpass.getuser(),
        "key_path": str(tmp / "agent_key"),
        "known_hosts": str(tmp / "known_hosts"),
        "remote_bind": f"127.0.0.1:{bind}",
        "state_dir": str(tmp / "agent"),
        "log_format": "json",
    }
    with procs.simulator() as sim:
        agent["upstream"] = sim
        edge_env = {f"BACKHAUL_EDGE_{k.upper()}": v for k, v in edge.items()}
        agent_env = {f"BACKHAUL_AGENT_{k.upper()}": v for k, v in agent.items()}
        with (
            procs.process([EDGE, "serve"], port, edge_env, tmp / "edge.log") as pid,
            procs.process([AGENT, "run"], bind, agent_env, tmp / "agent.log"),
        ):
            url = f"http://127.0.0.1:{port}"
            load.run(wait_ready(url))
            yield Stack(url, ssh_port, pid)


async def wait_ready(url: str) -> None:
    """Until the edge's /readyz says 200 (its probe has seen the model server)."""
    async with aiohttp.ClientSession() as session, asyncio.timeout(30):
        while True:
            async with session.get(f"{url}/readyz") as r:
                if r.status == 200:
                    return
            await asyncio.sleep(0.1)


async def refused(url: str) -> dict[str, float]:
    """listener -> connections the edge has refused at accept, from its /metrics."""
    async with aiohttp.ClientSession() as session, session.get(f"{url}/metrics") as r:
        text = await r.text()
    counts: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == "backhaul_connections_refused_total":
                listener = sample.labels["listener"]
                counts[listener] = counts.get(listener, 0.0) + sample.value
    return counts


async def wait_refused(url: str, listener: str, at_least: float) -> None:
    """Until the edge has refused `at_least` connections on `listener` (a scrape each 0.1 s:
    the count is in another process)."""
    async with asyncio.timeout(SETTLE_DEADLINE_S):
        while True:
            if (await refused(url)).get(listener, 0.0) >= at_least:
                return
            await asyncio.sleep(0.1)


async def normal_client(url: str, requests: int, fresh: bool) -> load.Result:
    """`requests` sequential non-streamed requests; each on a new connection when `fresh`."""
    body = load.generate_body(64, stream=False)
    latencies: list[float] = []
    errors = 0
    connector = aiohttp.TCPConnector(force_close=fresh)
    timeout = aiohttp.ClientTimeout(total=30)
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
        start = time.perf_counter()
        async with asyncio.timeout(load.RUN_DEADLINE_S):
            for _ in range(requests):
                began = time.perf_counter()
                try:
                    async with session.post(f"{url}/api/generate", json=body) as response:
                        await response.read()
                        errors += response.status != 200
                except aiohttp.ClientError:
                    errors += 1
                latencies.append((time.perf_counter() - began) * 1000.0)
        seconds = time.perf_counter() - start
    return load.Result(len(latencies), errors, seconds, latencies)


@dataclass(frozen=True)
class Window:
    """The edge's CPU seconds over a stretch of a run, and the connections it refused in it."""

    user_s: float = 0.0
    sys_s: float = 0.0
    refused: float = 0.0

    def __add__(self, other: Window) -> Window:
        return Window(
            self.user_s + other.user_s, self.sys_s + other.sys_s, self.refused + other.refused
        )

    def __sub__(self, other: Window) -> Window:
        return Window(
            self.user_s - other.user_s, self.sys_s - other.sys_s, self.refused - other.refused
        )

    def per_refused_us(self) -> dict[str, float]:
        """All, user and system CPU microseconds per refused connection."""
        n = self.refused / 1e6
        return {
            "all": (self.user_s + self.sys_s) / n,
            "user": self.user_s / n,
            "sys": self.sys_s / n,
        }


def so_far(s: Stack, listener: str) -> Window:
    """The edge's CPU and the refusals on `listener` since it started (none for "")."""
    user, system = user_system(s.edge_pid)
    gone = load.run(refused(s.url)).get(listener, 0.0) if listener else 0.0
    return Window(user, system, gone)


@dataclass(frozen=True)
class Condition:
    name: str
    keepalive: load.Result
    fresh: load.Result
    with_client: Window  # over both client runs
    alone: Window = Window()  # over `ALONE_S` of the flood, the client idle
    refused: float = 0.0  # by the edge, over the attacker's whole run
    attempts: int = 0  # connections the attacker started, over its whole run
    attacker_s: float = 0.0  # its run's length
    edge_fds: int = 0  # at the end of the client's runs (the most, once merged)

    def __add__(self, other: Condition) -> Condition:
        """Two rounds of one condition as one: samples pooled, counts and CPU summed."""

        def pooled(a: load.Result, b: load.Result) -> load.Result:
            return load.Result(
                a.requests + b.requests,
                a.errors + b.errors,
                a.seconds + b.seconds,
                a.latencies_ms + b.latencies_ms,
            )

        return Condition(
            self.name,
            pooled(self.keepalive, other.keepalive),
            pooled(self.fresh, other.fresh),
            self.with_client + other.with_client,
            self.alone + other.alone,
            self.refused + other.refused,
            self.attempts + other.attempts,
            self.attacker_s + other.attacker_s,
            max(self.edge_fds, other.edge_fds),
        )


def measure(s: Stack, name: str, requests: int, listener: str = "") -> Condition:
    """Both client runs, with the edge's CPU and refusals over them."""
    start = so_far(s, listener)
    keepalive = load.run(normal_client(s.url, requests, fresh=False))
    fresh = load.run(normal_client(s.url, requests, fresh=True))
    spent = so_far(s, listener) - start
    fds = len(os.listdir(f"/proc/{s.edge_pid}/fd"))
    return Condition(name, keepalive, fresh, spent, edge_fds=fds)


def flooded(s: Stack, name: str, port: int, listener: str, args: argparse.Namespace) -> Condition:
    """`measure` while a flood holds `port`, once the edge has refused a flood's worth; and the
    edge's CPU over `ALONE_S` of the flood with the client idle."""
    before = so_far(s, listener)
    with flood.flooding(port, args.connections, rate=args.rate) as attacker:
        load.run(wait_refused(s.url, listener, before.refused + args.connections))
        start = so_far(s, listener)
        time.sleep(ALONE_S)
        alone = so_far(s, listener) - start
        result = measure(s, name, args.requests, listener)
        stats = attacker.stop()
    gone = (so_far(s, listener) - before).refused
    return replace(
        result, alone=alone, refused=gone, attempts=stats.attempts, attacker_s=stats.seconds
    )


def run(args: argparse.Namespace) -> list[Condition]:
    """`--rounds` rounds of the three conditions in turn, each condition's rounds pooled (a
    slow moment of this shared machine then falls on all three, not on one)."""
    flood.raise_own_fd_limit()  # the attackers inherit this process's hard limit
    rounds: list[list[Condition]] = []
    with tempfile.TemporaryDirectory() as tmp_dir, stack(Path(tmp_dir)) as s:
        load.run(normal_client(s.url, 100, fresh=True))  # warm-up: connections, caches
        port = int(s.url.rpartition(":")[2])
        for _ in range(args.rounds):
            rounds.append(
                [
                    measure(s, "no flood", args.requests),
                    flooded(s, "HTTP port flood", port, "http", args),
                    flooded(s, "SSH port flood", s.ssh_port, "ssh", args),
                ]
            )
    return [sum(each[1:], each[0]) for each in zip(*rounds, strict=True)]


def figures(conditions: list[Condition]) -> list[dict[str, Any]]:
    base = conditions[0]
    out = []
    for c in conditions:
        row: dict[str, Any] = {"condition": c.name}
        for kind in ("keepalive", "fresh"):
            r, b = getattr(c, kind), getattr(base, kind)
            row[kind] = {
                "p50_ms": r.p50,
                "p99_ms": r.p99,
                "p50_ratio": r.p50 / b.p50,
                "p99_ratio": r.p99 / b.p99,
                "errors": r.errors,
            }
        row |= {
            "attacker_started": c.attempts,
            "attacker_per_s": c.attempts / c.attacker_s if c.attacker_s else 0.0,
            "edge_refused": c.refused,
            "edge_fds": c.edge_fds,
        }
        if c.alone.refused and c.with_client.refused:
            row["edge_cpu_us_per_refused"] = {
                "flood_alone": c.alone.per_refused_us(),
                "with_client": c.with_client.per_refused_us(),
            }
        out.append(row)
    return out


def print_tables(rows: list[dict[str, Any]], args: argparse.Namespace) -> None:
    reopen = f"at most {args.rate:.0f}/s" if args.rate else "at once"
    print(
        f"Normal client: {args.requests} x {args.rounds} sequential requests of each kind, edge"
        f" -> tunnel -> simulator | attacker from 127.0.0.2: {args.connections} connections, "
        f"reopened {reopen}"
    )
    print(
        f"{'condition':<16} {'client':<10} {'p50 ms':>7} {'p99 ms':>7} {'p50 x':>6} "
        f"{'p99 x':>6} {'errors':>6}"
    )
    for row in rows:
        for kind, label in (("keepalive", "keep-alive"), ("fresh", "new conn")):
            k = row[kind]
            name = row["condition"] if kind == "keepalive" else ""
            print(
                f"{name:<16} {label:<10} {k['p50_ms']:7.2f} {k['p99_ms']:7.2f} "
                f"{k['p50_ratio']:6.2f} {k['p99_ratio']:6.2f} {k['errors']:6d}"
            )
    print(
        f"{'flood':<16} {'started':>8} {'per s':>6} {'refused':>8} {'edge fds':>8} | edge CPU us"
        " per refused: flood alone (user+sys), with the client"
    )
    for row in rows:
        if "edge_cpu_us_per_refused" not in row:
            continue
        alone = row["edge_cpu_us_per_refused"]["flood_alone"]
        both = row["edge_cpu_us_per_refused"]["with_client"]
        print(
            f"{row['condition']:<16} {row['attacker_started']:8d} {row['attacker_per_s']:6.0f} "
            f"{row['edge_refused']:8.0f} {row['edge_fds']:8d} | {alone['all']:.1f} "
            f"({alone['user']:.1f}+{alone['sys']:.1f}), {both['all']:.1f}"
        )
    print(f"edge descriptors with no flood: {rows[0]['edge_fds']}")


def main() -> None:
    parser = cli.parser(__doc__, rounds=2, requests=250, requests_help="per client kind and round")
    parser.add_argument("--connections", type=int, default=3000)
    parser.add_argument("--rate", type=float, default=0.0, help="reopens a second (0: no cap)")
    args = parser.parse_args()
    rows = figures(run(args))
    print_tables(rows, args)
    if args.json:
        print(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
