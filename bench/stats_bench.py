"""Benchmark `backhaul-edge stats` over a generated 1,000,000-line log, against `jq`.

Run: `.venv/bin/python -m bench.stats_bench [--lines N]`. The log is written in a temporary
directory with real `RequestRecord(...).to_json_line()` records (a realistic mix of routes,
models, keys, statuses and null fields), then each command runs in its own subprocess and is
timed with a monotonic clock; its peak RSS is the child's own `ru_maxrss`, read from `os.wait4`
so that one command's peak cannot hide behind another's. Targets (issue 5): under 10 s and under
100 MB for `stats`. `jq` does the same count by status when installed, as the yardstick.
"""

from __future__ import annotations

import argparse
import os
import random
import shutil
import subprocess
import sys
import tempfile
import time
from collections import Counter
from datetime import UTC, datetime, timedelta
from pathlib import Path

import orjson

from edge.record import RequestRecord

TARGET_SECONDS = 10.0
TARGET_RSS_MB = 100.0
JQ_COUNT_BY_STATUS = "reduce inputs as $r ({}; .[$r.status | tostring] += 1)"


def write_log(path: Path, lines: int, seed: int = 5) -> Counter[int]:
    """Write `lines` records to `path`; return their count by status, to check the readers."""
    rng = random.Random(seed)
    start = datetime.now(UTC) - timedelta(days=2)
    step = timedelta(days=2) / lines
    routes = ["/api/chat", "/api/generate", "/v1/chat/completions", "/api/embed"]
    models = ["llama3.1:8b", "qwen2.5-coder:14b", "gemma3:12b", None]
    keys = ["site-a", "site-b", "batch", "alice", None]
    features = ["summarise", "translate", None, None]
    failures = [(429, "rate_limited"), (503, "agent_unavailable"), (504, "upstream_timeout")]
    by_status: Counter[int] = Counter()
    with open(path, "wb", buffering=1024 * 1024) as out:
        for i in range(lines):
            status, error, outcome = 200, None, "ok"
            roll = rng.random()
            if roll < 0.05:
                status, error = rng.choice(failures)
                outcome = "error"
            elif roll < 0.07:
                outcome = "client_gone"
            ok = status == 200
            tokens = rng.randint(1, 2000) if ok else None
            gen_ms = rng.uniform(50, 60_000) if ok else None
            ts = (start + step * i).isoformat(timespec="milliseconds").replace("+00:00", "Z")
            record = RequestRecord(
                id=f"{i:016x}",
                method="POST",
                route=rng.choice(routes),
                ts=ts,
                feature=rng.choice(features),
                model=rng.choice(models),
                key=rng.choice(keys),
                client="203.0.113.7",
                status=status,
                type=error,
                outcome=outcome,
                stream=rng.random() < 0.6,
                upstream="http://127.0.0.1:11434" if ok else None,
                queue_ms=rng.expovariate(1 / 40) if ok else None,
                ttfb_ms=rng.lognormvariate(5, 1) if ok else None,
                elapsed_ms=rng.lognormvariate(8, 1.2),
                overhead_ms=rng.uniform(0.1, 3),
                prompt_chars=rng.randint(10, 20_000),
                prompt_tokens=rng.randint(3, 5000) if ok else None,
                tokens=tokens,
                gen_ms=gen_ms,
                tok_per_s=tokens / gen_ms * 1000 if tokens and gen_ms else None,
                bytes_in=rng.randint(100, 80_000),
                bytes_out=rng.randint(100, 40_000) if ok else 120,
            )
            out.write(record.to_json_line())
            by_status[status] += 1
    return by_status


def measure(command: list[str]) -> tuple[float, float, bytes]:
    """Run `command`; return wall seconds, its own peak RSS in MB, and its stdout."""
    started = time.monotonic()
    proc = subprocess.Popen(command, stdout=subprocess.PIPE)
    assert proc.stdout is not None
    output = proc.stdout.read()
    _, status, usage = os.wait4(proc.pid, 0)
    seconds = time.monotonic() - started
    proc.returncode = os.waitstatus_to_exitcode(status)  # reaped here: keep Popen from waiting
    if proc.returncode != 0:
        raise SystemExit(f"{command[0]} exited {proc.returncode}")
    return seconds, usage.ru_maxrss / 1024, output  # ru_maxrss is in KiB on Linux


def edge_command() -> list[str]:
    script = Path(sys.executable).with_name("backhaul-edge")
    return [str(script)] if script.exists() else [sys.executable, "-m", "edge"]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--lines", type=int, default=1_000_000)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="stats-bench-") as tmp:
        log = Path(tmp) / "telemetry.jsonl"
        started = time.monotonic()
        expected = write_log(log, args.lines)
        size_mb = log.stat().st_size / 1e6
        took = time.monotonic() - started
        print(f"generated {args.lines:,} lines, {size_mb:,.0f} MB in {took:.1f} s")

        edge = edge_command()
        rows = []
        seconds, rss, _ = measure([*edge, "stats", str(log)])
        rows.append(("backhaul-edge stats", seconds, rss))
        seconds, rss, output = measure([*edge, "stats", str(log), "--by", "status", "--json"])
        rows.append(("backhaul-edge stats --by status --json", seconds, rss))
        ours = {g["value"]: g["requests"] for g in orjson.loads(output)["groups"]}
        assert ours == dict(expected), (ours, expected)

        if shutil.which("jq"):
            seconds, rss, output = measure(["jq", "-n", JQ_COUNT_BY_STATUS, str(log)])
            rows.append(("jq count by status", seconds, rss))
            theirs = {int(k): v for k, v in orjson.loads(output).items()}
            assert theirs == dict(expected), (theirs, expected)
        else:
            print("jq not installed")

    print(f"{'command':<40} {'seconds':>8} {'peak RSS MB':>12}")
    for name, seconds, rss in rows:
        print(f"{name:<40} {seconds:>8.2f} {rss:>12.1f}")
    missed = [
        name for name, seconds, rss in rows[:2] if seconds > TARGET_SECONDS or rss > TARGET_RSS_MB
    ]
    print(
        f"targets: < {TARGET_SECONDS:.0f} s, < {TARGET_RSS_MB:.0f} MB: "
        + ("missed by " + ", ".join(missed) if missed else "met")
    )
    return 1 if missed else 0


if __name__ == "__main__":
    sys.exit(main())
