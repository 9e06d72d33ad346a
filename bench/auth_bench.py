"""What API keys and rate limits cost: W1 through an open edge vs a keyed, rate-limited one.

Run: `.venv/bin/python -m bench.auth_bench` (or `make bench BENCH_ARGS=--auth`). Two edges run
side by side against one simulator: one with `auth=none`, one with `auth=keys` and a key that
has rpm and tpm limits (set high enough never to refuse, so every request does the whole work:
ban check, SHA-256 and lookup, two bucket checks, the tokens charged after the response). W1
(non-streamed /api/generate, 64 tokens) runs at concurrency 1 and 32 against each, alternating,
`--rounds` times after a warm-up; the added cost is the median of the rounds' paired
differences. An in-process figure (`Guard.admit` + `settle` on a mocked request, no network)
shows the check's own cost without the noise of two processes sharing two cores. Target
(issue 4): auth + limits add at most 0.2 ms at p50.
"""

from __future__ import annotations

import asyncio
import json
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

from aiohttp.test_utils import make_mocked_request

from bench import cli, load, procs
from edge.exchange import Exchange
from edge.policy.bans import BanList
from edge.policy.guard import Guard
from edge.policy.keys import ApiKey, KeysFile, KeyStore, digest, new_secret, write_keys_file
from edge.record import RequestRecord
from edge.settings import EdgeSettings

TARGET_ADDED_P50_MS = 0.2
# Limits that are checked and charged on every request but never refuse one in a run.
_RPM = 10_000_000
_TPM = 10_000_000_000


def pair(off: str, on: str, key: str, concurrency: int, total: int, rounds: int) -> dict[str, Any]:
    """Alternate open and keyed runs; the added cost is the median of the rounds' differences
    (paired, so a slow moment of the shared machine hits both sides of one difference)."""
    auth = {"Authorization": f"Bearer {key}"} if key else {}
    pairs = load.w1_rounds(off, on, concurrency, total, rounds, headers=auth)
    each_round = [k.p50 - o.p50 for o, k in pairs]
    added_p50 = statistics.median(each_round)
    added_p99 = statistics.median(k.p99 - o.p99 for o, k in pairs)
    o, k = load.median_round(pairs)
    return {
        "concurrency": concurrency,
        "requests": total,
        "rounds": rounds,
        "off": o.w1_figures(),
        "on": k.w1_figures(),
        "added_p50_ms": added_p50,
        "added_p99_ms": added_p99,
        "added_p50_each_round_ms": each_round,
    }


def in_process(calls: int = 100_000) -> dict[str, Any]:
    """Microseconds per request of `Guard.admit` + `settle`, keyed and rate-limited."""
    secret = new_secret()
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "keys.json"
        key = ApiKey(name="bench", hash=digest(secret), rpm=_RPM, tpm=_TPM)
        write_keys_file(path, KeysFile(keys=[key]))
        store = KeyStore(path)
        store.load()
    settings = EdgeSettings(auth="keys", keys_path=path, bans_path=None, telemetry_path=None)
    guard = Guard(settings, store, BanList(None))
    request = make_mocked_request(
        "POST", "/api/generate", headers={"Authorization": f"Bearer {secret}"}
    )

    async def run() -> float:
        # Awaited as the middleware awaits them; with the edge's own limits nothing suspends.
        start = time.perf_counter()
        for _ in range(calls):
            ex = Exchange(
                path="/api/generate",
                record=RequestRecord(
                    id="b", method="POST", route="/api/generate", client="1.2.3.4"
                ),
            )
            guard.check_ban(ex)
            await guard.admit(request, ex, None)
            ex.record.prompt_tokens, ex.record.tokens = 10, 64
            await guard.settle(ex)
        return (time.perf_counter() - start) / calls * 1e6

    return {"calls": calls, "us_per_request": asyncio.run(run())}


def noise_floor(requests: int, rounds: int) -> dict[str, Any]:
    """The same measurement between two identical open edges (an A/A test): how large a
    difference this machine produces when there is none."""
    with tempfile.TemporaryDirectory() as tmp_dir:
        tmp = Path(tmp_dir)
        common = {"max_inflight": "64", "queue_max": "4096", "log_level": "warning"}
        with (
            procs.simulator() as sim,
            procs.edge(sim, tmp / "a.jsonl", auth="none", **common) as a,
            procs.edge(sim, tmp / "b.jsonl", auth="none", **common) as b,
        ):
            results = {}
            for concurrency in (1, 32):
                r = pair(a, b, "", concurrency, requests, rounds)
                results[f"w1_c{concurrency}"] = r
                each = ", ".join(f"{x:+.2f}" for x in r["added_p50_each_round_ms"])
                print(
                    f"A/A W1 c={concurrency:<3} p50 differences by round: {each} ms "
                    f"(median {r['added_p50_ms']:+.3f})"
                )
    return results


def run_section(requests: int, rounds: int) -> dict[str, Any]:
    """Both edges, W1 at c=1 and c=32, and the in-process figure; prints as it goes."""
    results: dict[str, Any] = {"in_process": in_process()}
    print(f"auth+limits in-process: {results['in_process']['us_per_request']:.1f} us per request")
    with tempfile.TemporaryDirectory() as tmp_dir:
        tmp = Path(tmp_dir)
        secret = new_secret()
        key = ApiKey(name="bench", hash=digest(secret), rpm=_RPM, tpm=_TPM)
        write_keys_file(tmp / "keys.json", KeysFile(keys=[key]))
        common = {"max_inflight": "64", "queue_max": "4096", "log_level": "warning"}
        keyed = {"auth": "keys", "keys_path": str(tmp / "keys.json")}
        with (
            procs.simulator() as sim,
            procs.edge(sim, tmp / "off.jsonl", auth="none", **common) as off,
            procs.edge(
                sim, tmp / "on.jsonl", bans_path=str(tmp / "bans.json"), **keyed, **common
            ) as on,
        ):
            for concurrency in (1, 32):
                r = pair(off, on, secret, concurrency, requests, rounds)
                results[f"w1_c{concurrency}"] = r
                _print(r)
        if secret in (tmp / "on.jsonl").read_text():
            raise RuntimeError("the secret is in the telemetry log")
    return results


def _print(r: dict[str, Any]) -> None:
    verdict = "ok" if r["added_p50_ms"] <= TARGET_ADDED_P50_MS else "OVER TARGET"
    print(
        f"W1 c={r['concurrency']:<3} auth+limits off {load.w1_text(r['off'])} | "
        f"on {load.w1_text(r['on'])} | added p50 {r['added_p50_ms']:+.3f} ms "
        f"p99 {r['added_p99_ms']:+.2f} ms ({verdict}: target <= {TARGET_ADDED_P50_MS} ms at p50)"
    )


def main() -> None:
    parser = cli.parser(__doc__, requests=2000)
    parser.add_argument(
        "--noise", action="store_true", help="also run two identical open edges (A/A)"
    )
    args = parser.parse_args()
    results = run_section(args.requests, args.rounds)
    if args.noise:
        results["noise_floor"] = noise_floor(args.requests, args.rounds)
    if args.json:
        print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
