"""`backhaul-edge stats` over generated logs: rotation, gzip, damage, --since, --by, --json."""

from __future__ import annotations

import gzip
import json
import math
import os
import subprocess
import sys
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import orjson
import pytest

from edge.__main__ import main
from edge.ops import logfiles, stats
from edge.ops.quantiles import EXACT_LIMIT, RELATIVE_ERROR, QuantileSketch
from edge.ops.timeparse import parse_since, parse_time
from edge.record import RequestRecord
from edge.settings import EdgeSettings

BASE = datetime(2026, 11, 20, 12, 0, tzinfo=UTC)


def ts(seconds: float, base: datetime = BASE) -> str:
    when = base + timedelta(seconds=seconds)
    return when.isoformat(timespec="milliseconds").replace("+00:00", "Z")


def line(i: int = 0, **fields) -> bytes:
    fields.setdefault("ts", ts(i))
    fields.setdefault("route", "/api/chat")
    return RequestRecord(id=f"req-{i}", method="POST", **fields).to_json_line()


def costed(i: int, served_by: str | None, cost_usd: float | None, **fields) -> bytes:
    """A line with the money fields, set on the JSON so the line is as the edge writes it."""
    record = orjson.loads(line(i, **fields))
    record.update(served_by=served_by, cost_usd=cost_usd)
    return orjson.dumps(record, option=orjson.OPT_APPEND_NEWLINE)


def write(path: Path, *lines: bytes) -> Path:
    data = b"".join(lines)
    path.write_bytes(gzip.compress(data) if path.name.endswith(".gz") else data)
    return path


def stats_json(capsys, *argv: str) -> dict[str, Any]:
    assert main(["stats", *argv, "--json"]) == 0
    report: dict[str, Any] = json.loads(capsys.readouterr().out)
    return report


def only_group(report: dict[str, Any]) -> dict[str, Any]:
    [group] = report["groups"]
    assert isinstance(group, dict)
    return group


def test_figures_of_known_data_value_by_value(tmp_path, capsys):
    log = write(
        tmp_path / "telemetry.jsonl",
        *(
            line(
                i,
                status=200,
                elapsed_ms=float(i),
                ttfb_ms=float(i) / 2,
                tok_per_s=float(i),
                queue_ms=float(100 - i),
                prompt_tokens=i,
                tokens=2 * i,
                outcome="client_gone" if i % 25 == 0 else "ok",
            )
            for i in range(1, 101)
        ),
        line(101, status=503, type="agent_unavailable", outcome="error", elapsed_ms=1000.0),
        line(102, status=429, type="rate_limited", outcome="error", elapsed_ms=1000.0),
        line(103, status=429, type="rate_limited", outcome="error", elapsed_ms=1000.0),
    )
    report = stats_json(capsys, str(log))
    assert report["files"] == [str(log)]
    assert (report["lines"], report["corrupt"], report["records"]) == (103, 0, 103)
    group = only_group(report)
    assert group["value"] is None
    assert group["requests"] == 103
    assert group["errors"] == {
        "total": 3,
        "by_type": {"rate_limited": 2, "agent_unavailable": 1},
    }
    assert group["client_gone"] == 4
    # Nearest rank over 1..100 plus three 1000s: rank ceil(q * 103).
    assert group["elapsed_ms"] == {"n": 103, "exact": True, "p50": 52.0, "p95": 98.0, "p99": 1000.0}
    # Null ttfb/tok_per_s/queue on the three errors: left out of those figures only.
    assert group["ttfb_ms"] == {"n": 100, "exact": True, "p50": 25.0, "p95": 47.5, "p99": 49.5}
    assert group["tok_per_s"] == {"n": 100, "exact": True, "p50": 50.0, "p10": 10.0}
    assert group["queue_ms"] == {"n": 100, "exact": True, "p50": 49.0, "p99": 98.0}
    assert group["prompt_tokens"] == sum(range(1, 101))
    assert group["tokens"] == 2 * sum(range(1, 101))


def test_rotated_and_gzipped_siblings_are_read_oldest_first(tmp_path, capsys):
    base = tmp_path / "telemetry.jsonl"
    write(tmp_path / "telemetry.jsonl.3.gz", line(1, elapsed_ms=1.0))
    write(tmp_path / "telemetry.jsonl.2.gz", line(2, elapsed_ms=2.0), line(3, elapsed_ms=3.0))
    write(tmp_path / "telemetry.jsonl.1", line(4, elapsed_ms=4.0))
    write(base, line(5, elapsed_ms=5.0))
    # Gzip'd without the suffix (compressed in place): recognised by its magic bytes.
    (tmp_path / "telemetry.jsonl.4").write_bytes(gzip.compress(line(0, elapsed_ms=0.5)))
    write(tmp_path / "other.jsonl.1", line(9, elapsed_ms=9.0))  # not a sibling

    report = stats_json(capsys, str(base))
    assert report["files"] == [
        str(tmp_path / name)
        for name in [
            "telemetry.jsonl.4",
            "telemetry.jsonl.3.gz",
            "telemetry.jsonl.2.gz",
            "telemetry.jsonl.1",
            "telemetry.jsonl",
        ]
    ]
    assert report["records"] == 6
    assert only_group(report)["elapsed_ms"]["p99"] == 5.0

    # A rotated file named on its own is read alone, and a file given twice is read once.
    report = stats_json(capsys, str(tmp_path / "telemetry.jsonl.2.gz"), str(base))
    assert report["records"] == 6
    report = stats_json(capsys, str(tmp_path / "telemetry.jsonl.2.gz"))
    assert report["files"] == [str(tmp_path / "telemetry.jsonl.2.gz")]
    assert report["records"] == 2


def test_default_path_is_the_edge_default(tmp_path, capsys, monkeypatch):
    assert EdgeSettings().telemetry_path == logfiles.DEFAULT_PATH  # in the edge's state directory
    monkeypatch.setattr(stats, "DEFAULT_PATH", Path("telemetry.jsonl"))
    monkeypatch.chdir(tmp_path)
    write(tmp_path / "telemetry.jsonl", line(1))
    write(tmp_path / "telemetry.jsonl.1", line(0))
    assert main(["stats", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["files"] == ["telemetry.jsonl.1", "telemetry.jsonl"]


def test_corrupt_and_truncated_lines_are_counted_and_skipped(tmp_path, capsys):
    good = [line(i, elapsed_ms=10.0 * i) for i in range(1, 4)]
    bad = [
        b"not json at all\n",
        line(4)[:40] + b"\n",  # cut mid-record by a crash
        b"[1, 2, 3]\n",  # JSON, not a record
        b'{"id": "x", "status": 200}\n',  # no schema version
        line(5, elapsed_ms=1.0).replace(b'"elapsed_ms":1.0', b'"elapsed_ms":"fast"'),
        line(6, type=None).replace(b'"type":null', b'"type":{"a":1}'),
        line(7, status=200).replace(b'"model":null', b'"model":["x"]'),  # unhashable group
        b"\xff\xfe garbage bytes\n",
    ]
    log = write(tmp_path / "t.jsonl", good[0], *bad, b"\n", good[1], good[2], line(8)[:30])
    report = stats_json(capsys, str(log), "--by", "model")
    assert report["corrupt"] == len(bad) + 1  # + the unfinished last line; the blank one is not
    assert report["lines"] == len(good) + len(bad) + 2
    group = only_group(report)
    assert group["requests"] == 3
    assert group["elapsed_ms"]["n"] == 3
    assert group["elapsed_ms"]["p99"] == 30.0

    # Ungrouped, the list in `model` harms no figure: that record counts.
    assert main(["stats", str(log)]) == 0
    out = capsys.readouterr().out
    assert "lines: 13 read, 8 corrupt or truncated (skipped)" in out
    assert "requests      4" in out


def test_damaged_gzip_is_reported_and_what_was_read_still_counts(tmp_path, capsys):
    data = gzip.compress(b"".join(line(i, elapsed_ms=float(i)) for i in range(2000)))
    (tmp_path / "t.jsonl.1.gz").write_bytes(data[: len(data) // 2])
    write(tmp_path / "t.jsonl", line(5000, elapsed_ms=1.0))
    report = stats_json(capsys, str(tmp_path / "t.jsonl"))
    assert len(report["file_errors"]) == 1
    assert "t.jsonl.1.gz" in report["file_errors"][0]
    assert 1 < report["records"] < 2001  # part of the damaged file, then the live one


def test_since_filters_by_ts(tmp_path, capsys):
    log = write(tmp_path / "t.jsonl", *(line(i, ts=ts(3600 * i), status=200) for i in range(48)))
    # Written "after" its last record whatever this machine's clock says, so that it is read.
    later = (BASE + timedelta(days=30)).timestamp()
    os.utime(log, (later, later))
    report = stats_json(capsys, str(log), "--since", "2026-11-21")
    assert report["since"] == "2026-11-21T00:00:00.000Z"
    assert (report["records"], report["before_since"]) == (36, 12)

    report = stats_json(capsys, str(log), "--since", "2026-11-22T10:30:00+01:00")
    assert report["since"] == "2026-11-22T09:30:00.000Z"
    assert (report["records"], report["before_since"]) == (2, 46)  # 10:00 and 11:00 UTC


def test_since_relative_to_now_and_old_rotated_files_skipped(tmp_path, capsys):
    now = datetime.now(UTC)
    old = write(tmp_path / "t.jsonl.1", line(1, ts=ts(-86400 * 3, now)))
    long_ago = (now - timedelta(days=3)).timestamp()
    os.utime(old, (long_ago, long_ago))
    write(
        tmp_path / "t.jsonl",
        line(2, ts=ts(-3 * 3600, now)),
        line(3, ts=ts(-600, now)),
        line(4, ts=ts(-60, now)),
    )
    report = stats_json(capsys, str(tmp_path / "t.jsonl"), "--since", "1h")
    assert report["files_skipped"] == [str(old)]
    assert report["files"] == [str(tmp_path / "t.jsonl")]
    assert (report["records"], report["before_since"]) == (2, 1)

    # Nothing recent enough: an empty report, not an error.
    report = stats_json(capsys, str(old), "--since", "1h")
    assert (report["files"], report["records"], report["groups"]) == ([], 0, [])

    assert main(["stats", str(tmp_path / "t.jsonl"), "--since", "2d"]) == 0
    out = capsys.readouterr().out
    assert "skipped (last written before --since)" in out
    assert "3 read" in out


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("30m", BASE - timedelta(minutes=30)),
        ("1h", BASE - timedelta(hours=1)),
        ("2d", BASE - timedelta(days=2)),
        ("1w", BASE - timedelta(weeks=1)),
        ("45s", BASE - timedelta(seconds=45)),
        ("2026-11-19", datetime(2026, 11, 19, tzinfo=UTC)),
        ("2026-11-19T08:15:00Z", datetime(2026, 11, 19, 8, 15, tzinfo=UTC)),
        ("2026-11-19T08:15:00", datetime(2026, 11, 19, 8, 15, tzinfo=UTC)),
        ("2026-11-19T09:15:00+01:00", datetime(2026, 11, 19, 8, 15, tzinfo=UTC)),
    ],
)
def test_parse_since(text, expected):
    assert parse_since(text, now=BASE) == expected


def test_parse_time_forwards_with_fewer_units():
    # `keys add --expires`: after now, and without `s` or `m` (months or minutes?).
    assert parse_time("30d", BASE, ago=False, units="hdw") == BASE + timedelta(days=30)
    midnight = datetime(2026, 12, 1, tzinfo=UTC)
    assert parse_time("2026-12-01", BASE, ago=False, units="hdw") == midnight
    with pytest.raises(ValueError, match="Invalid isoformat"):
        parse_time("30m", BASE, ago=False, units="hdw")


def test_bad_since_is_a_usage_error(tmp_path, capsys):
    with pytest.raises(SystemExit) as exc:
        main(["stats", str(tmp_path / "t.jsonl"), "--since", "yesterday"])
    assert exc.value.code == 2
    assert "not a duration, date or ISO time" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("by", "expected"),
    [
        ("model", {"llama3.1:8b": 3, "gemma3:12b": 2, None: 1}),
        ("key", {"alice": 4, "bob": 2}),
        ("feature", {None: 4, "summarise": 2}),
        ("route", {"/api/chat": 3, "/api/generate": 2, "/v1/chat/completions": 1}),
        ("status", {200: 4, 503: 1, 429: 1}),
        ("agent", {None: 6}),
        ("served_by", {None: 6}),
    ],
)
def test_group_by_each_field(tmp_path, capsys, by, expected):
    rows = [
        ("llama3.1:8b", "alice", None, "/api/chat", 200),
        ("llama3.1:8b", "alice", None, "/api/chat", 200),
        ("llama3.1:8b", "bob", "summarise", "/api/generate", 503),
        ("gemma3:12b", "alice", "summarise", "/api/generate", 200),
        ("gemma3:12b", "bob", None, "/api/chat", 429),
        (None, "alice", None, "/v1/chat/completions", 200),
    ]
    log = write(
        tmp_path / "t.jsonl",
        *(
            line(i, model=m, key=k, feature=f, route=r, status=s, elapsed_ms=float(i))
            for i, (m, k, f, r, s) in enumerate(rows)
        ),
    )
    report = stats_json(capsys, str(log), "--by", by)
    assert report["by"] == by
    assert {g["value"]: g["requests"] for g in report["groups"]} == expected
    # Busiest first.
    assert [g["requests"] for g in report["groups"]] == sorted(expected.values(), reverse=True)


def test_text_report(tmp_path, capsys):
    log = write(
        tmp_path / "t.jsonl",
        line(1, model="llama3.1:8b", elapsed_ms=1200.0, ttfb_ms=80.0, tok_per_s=40.0),
        line(2, model="llama3.1:8b", status=503, type="agent_unavailable", elapsed_ms=2.0),
        line(3, model="gemma3:12b", outcome="client_gone", prompt_tokens=12, tokens=3400),
        b"{broken\n",
    )
    assert main(["stats", str(log), "--by", "model"]) == 0
    out = capsys.readouterr().out
    assert f"files: {log}" in out
    assert "lines: 4 read, 1 corrupt or truncated (skipped)" in out
    llama = out[out.index("model llama3.1:8b") : out.index("model gemma3:12b")]
    assert "requests      2" in llama
    assert "errors        1  (agent_unavailable 1)" in llama
    assert "elapsed ms    p50 2.0   p95 1,200.0   p99 1,200.0   (n 2)" in llama
    assert "tok/s         p50 40.0   p10 40.0   (n 1)" in llama
    assert "queue ms      p50 -   p99 -   (n 0)" in llama
    gemma = out[out.index("model gemma3:12b") :]
    assert "client gone   1" in gemma
    assert "tokens        in 12  out 3,400" in gemma


def test_no_log_is_an_error(tmp_path, capsys):
    assert main(["stats", str(tmp_path / "missing.jsonl")]) == 1
    assert "no log found" in capsys.readouterr().err


def test_sketch_is_exact_when_small_and_within_bound_when_large():
    small = QuantileSketch()
    for v in [5.0, 1.0, 3.0, 2.0, 4.0]:
        small.add(v)
    assert small.exact
    assert small.quantiles([0.5, 0.2, 1.0]) == [3.0, 1.0, 5.0]
    assert QuantileSketch().quantiles([0.5]) == [None]

    large = QuantileSketch()
    values = [0.0] * 100 + [float(i) for i in range(1, 10 * EXACT_LIMIT)]
    for v in reversed(values):
        large.add(v)
    assert not large.exact
    assert len(large) == len(values)
    for q, got in zip(
        [0.001, 0.5, 0.9, 0.99], large.quantiles([0.001, 0.5, 0.9, 0.99]), strict=True
    ):
        want = values[math.ceil(q * len(values)) - 1]
        assert got is not None
        assert abs(got - want) <= RELATIVE_ERROR * want + 1e-9, (q, got, want)


def test_installed_script(tmp_path):
    script = Path(sys.executable).with_name("backhaul-edge")
    assert script.exists(), "the package is installed in this venv (make venv)"
    log = write(tmp_path / "t.jsonl", line(1, elapsed_ms=7.0), b"junk\n")
    write(tmp_path / "t.jsonl.1.gz", line(0, elapsed_ms=3.0))
    done = subprocess.run(
        [str(script), "stats", str(log), "--json"],
        capture_output=True,
        check=True,
        timeout=30,
    )
    report = json.loads(done.stdout)
    assert (report["records"], report["corrupt"]) == (2, 1)
    assert only_group(report)["elapsed_ms"]["p50"] == 3.0


def cost_log(tmp_path: Path) -> Path:
    return write(
        tmp_path / "t.jsonl",
        costed(1, "cloud:openai", 0.25, key="alice"),
        costed(2, "cloud:openai", 1.5, key="alice"),
        costed(3, "cloud:groq", 0.125, key="bob"),
        costed(4, "tower", 0.5, key="alice"),
        costed(5, "tower", 2.0, key="bob"),
        costed(6, "laptop", 0.0625, key="bob"),
        costed(7, None, None, key="alice", status=429, type="rate_limited"),  # refused: no cost
        costed(8, "tower", None, key="bob"),  # no reference price configured
        line(9, key="carol"),  # a line from before the money fields
    )


def test_cost_split_into_cloud_spend_and_local_savings(tmp_path, capsys):
    log = cost_log(tmp_path)
    report = stats_json(capsys, str(log))
    assert report["cost_usd"] == {"n": 6, "cloud_usd": 1.875, "saved_usd": 2.5625}
    assert only_group(report)["cost_usd"] == report["cost_usd"]

    assert main(["stats", str(log)]) == 0
    out = capsys.readouterr().out
    assert "cost usd      cloud $1.8750   saved $2.5625   (n 6)" in out
    assert out.endswith("\ncloud spend $1.88; local answers saved $2.56\n")


def test_spend_by_served_by_and_by_key(tmp_path, capsys):
    log = cost_log(tmp_path)
    report = stats_json(capsys, str(log), "--by", "served_by")
    by_server = {g["value"]: (g["requests"], g["cost_usd"]) for g in report["groups"]}
    assert by_server == {
        "cloud:openai": (2, {"n": 2, "cloud_usd": 1.75, "saved_usd": 0.0}),
        "cloud:groq": (1, {"n": 1, "cloud_usd": 0.125, "saved_usd": 0.0}),
        "tower": (3, {"n": 2, "cloud_usd": 0.0, "saved_usd": 2.5}),
        "laptop": (1, {"n": 1, "cloud_usd": 0.0, "saved_usd": 0.0625}),
        None: (2, {"n": 0, "cloud_usd": 0.0, "saved_usd": 0.0}),
    }
    assert report["cost_usd"] == {"n": 6, "cloud_usd": 1.875, "saved_usd": 2.5625}

    report = stats_json(capsys, str(log), "--by", "key")
    by_key = {g["value"]: g["cost_usd"] for g in report["groups"]}
    assert by_key == {
        "alice": {"n": 3, "cloud_usd": 1.75, "saved_usd": 0.5},
        "bob": {"n": 3, "cloud_usd": 0.125, "saved_usd": 2.0625},
        "carol": {"n": 0, "cloud_usd": 0.0, "saved_usd": 0.0},
    }

    assert main(["stats", str(log), "--by", "key"]) == 0
    out = capsys.readouterr().out
    alice = out[out.index("key alice") : out.index("key bob")]
    assert "cost usd      cloud $1.7500   saved $0.5000   (n 3)" in alice
    bob = out[out.index("key bob") : out.index("key carol")]
    assert "cost usd      cloud $0.1250   saved $2.0625   (n 3)" in bob
    assert "cloud spend $1.88; local answers saved $2.56" in out


def test_no_cost_no_money_lines(tmp_path, capsys):
    log = write(tmp_path / "t.jsonl", line(1), costed(2, "tower", None), costed(3, "cloud:x", None))
    assert main(["stats", str(log)]) == 0
    out = capsys.readouterr().out
    assert "cost usd" not in out and "cloud spend" not in out
    assert stats_json(capsys, str(log))["cost_usd"] == {"n": 0, "cloud_usd": 0.0, "saved_usd": 0.0}


def test_bad_money_fields_make_the_record_corrupt(tmp_path, capsys):
    log = write(
        tmp_path / "t.jsonl",
        costed(1, "cloud:openai", 1.0, elapsed_ms=1.0),
        costed(2, "cloud:openai", "1.0", elapsed_ms=2.0),  # type: ignore[arg-type]
        costed(3, "cloud:openai", True, elapsed_ms=3.0),
        costed(4, ["cloud:openai"], 1.0, elapsed_ms=4.0),  # type: ignore[arg-type]
    )
    report = stats_json(capsys, str(log))
    assert (report["records"], report["corrupt"]) == (1, 3)
    assert report["cost_usd"] == {"n": 1, "cloud_usd": 1.0, "saved_usd": 0.0}
    assert only_group(report)["elapsed_ms"]["n"] == 1
