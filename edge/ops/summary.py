"""What a telemetry log says: the figures per group, read in one streaming pass.

`summarise` reads each file a line at a time (plain or gzip'd, `edge.ops.logfiles.open_log`), parses
it with orjson (`edge.record.parse_line`) and adds it to its group's `GroupStats`: counters,
sums, and four `QuantileSketch`es (exact up to 8,192 values, then a log-bucketed histogram within
1 %), so memory depends on the number of groups, never on the size of the log. Money is two sums
per group: `cost_usd` of the answers a cloud served (`served_by` `cloud:<name>`), what was spent,
and of the others, what the same tokens would have cost on the reference model, so what local
answers saved. A line that is not
a record (corrupt, cut short by a crash, a figure that is not a number) is counted and left out
whole; a null field is left out of its own figure only. `--since` compares `ts` as text: the
writer emits one ISO 8601 UTC format, whose text order is time order.
"""

from __future__ import annotations

import zlib
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from edge.ops.logfiles import open_log
from edge.ops.quantiles import EXACT_LIMIT, RELATIVE_ERROR, QuantileSketch
from edge.record import parse_line

# What a figure or the error type may be; bool is not a number here (it is a corrupt record).
_NUMBER_TYPES = frozenset({int, float, type(None)})
_TEXT_TYPES = frozenset({str, type(None)})
# How `served_by` names an answer a cloud served (`cloud:<upstream name>`); any other is local.
CLOUD_PREFIX = "cloud:"


class GroupStats:
    """The figures for one group of records."""

    __slots__ = (
        "client_gone",
        "cloud_usd",
        "costed",
        "elapsed",
        "errors",
        "prompt_tokens",
        "queue",
        "requests",
        "saved_usd",
        "tok_per_s",
        "tokens",
        "ttfb",
    )

    def __init__(self) -> None:
        self.requests = 0
        self.errors: Counter[str] = Counter()
        self.client_gone = 0
        self.prompt_tokens = 0
        self.tokens = 0
        self.elapsed = QuantileSketch()
        self.ttfb = QuantileSketch()
        self.tok_per_s = QuantileSketch()
        self.queue = QuantileSketch()
        self.costed = 0  # records with a cost_usd
        self.cloud_usd = 0.0
        self.saved_usd = 0.0

    def add(self, rec: dict[str, Any]) -> None:
        """Count one record; raises `TypeError`, changing nothing, on a field of a bad type."""
        get = rec.get
        error, outcome = get("type"), get("outcome")
        elapsed, ttfb, tps = get("elapsed_ms"), get("ttfb_ms"), get("tok_per_s")
        queue, prompt_tokens, tokens = get("queue_ms"), get("prompt_tokens"), get("tokens")
        cost, served_by = get("cost_usd"), get("served_by")
        # Check every field before counting any, so that a bad record is left out whole. One set
        # comparison costs less than eight isinstance() calls in the 1M-line loop.
        types = {type(elapsed), type(ttfb), type(tps), type(queue), type(prompt_tokens)}
        types.add(type(tokens))
        types.add(type(cost))
        texts = {type(error), type(served_by)}
        if not (types <= _NUMBER_TYPES and texts <= _TEXT_TYPES):
            raise TypeError("a figure is not a number, or type or served_by is not a string")
        self.requests += 1
        if error is not None:
            self.errors[error] += 1
        if outcome == "client_gone":
            self.client_gone += 1
        if elapsed is not None:
            self.elapsed.add(elapsed)
        if ttfb is not None:
            self.ttfb.add(ttfb)
        if tps is not None:
            self.tok_per_s.add(tps)
        if queue is not None:
            self.queue.add(queue)
        if prompt_tokens is not None:
            self.prompt_tokens += prompt_tokens
        if tokens is not None:
            self.tokens += tokens
        if cost is not None:
            self.costed += 1
            if served_by is not None and served_by.startswith(CLOUD_PREFIX):
                self.cloud_usd += cost
            else:
                self.saved_usd += cost

    def to_dict(self) -> dict[str, Any]:
        return {
            "requests": self.requests,
            "errors": {
                "total": sum(self.errors.values()),
                "by_type": dict(self.errors.most_common()),
            },
            "client_gone": self.client_gone,
            "elapsed_ms": _percentiles(self.elapsed, p50=0.5, p95=0.95, p99=0.99),
            "ttfb_ms": _percentiles(self.ttfb, p50=0.5, p95=0.95, p99=0.99),
            "tok_per_s": _percentiles(self.tok_per_s, p50=0.5, p10=0.1),
            "prompt_tokens": self.prompt_tokens,
            "tokens": self.tokens,
            "queue_ms": _percentiles(self.queue, p50=0.5, p99=0.99),
            "cost_usd": _costs(self.costed, self.cloud_usd, self.saved_usd),
        }


def _costs(n: int, cloud_usd: float, saved_usd: float) -> dict[str, Any]:
    return {"n": n, "cloud_usd": cloud_usd, "saved_usd": saved_usd}


def _percentiles(sketch: QuantileSketch, **qs: float) -> dict[str, Any]:
    values = sketch.quantiles(qs.values())
    return {"n": len(sketch), "exact": sketch.exact, **dict(zip(qs, values, strict=True))}


@dataclass
class Summary:
    """What one `stats` run read and found."""

    since: datetime | None
    by: str | None
    files_read: list[Path] = field(default_factory=list)
    files_skipped: list[Path] = field(default_factory=list)  # last written before --since
    file_errors: list[str] = field(default_factory=list)
    lines: int = 0
    corrupt: int = 0
    before_since: int = 0
    groups: dict[Any, GroupStats] = field(default_factory=dict)

    def ordered_groups(self) -> list[tuple[Any, GroupStats]]:
        """Busiest group first; ties by value, so the output is stable."""
        return sorted(self.groups.items(), key=lambda item: (-item[1].requests, str(item[0])))

    def costs(self) -> dict[str, Any]:
        """Money over every group: records with a `cost_usd`, cloud spend, local savings."""
        groups = self.groups.values()
        return _costs(
            sum(g.costed for g in groups),
            sum(g.cloud_usd for g in groups),
            sum(g.saved_usd for g in groups),
        )

    def to_dict(self) -> dict[str, Any]:
        return {
            "files": [str(p) for p in self.files_read],
            "files_skipped": [str(p) for p in self.files_skipped],
            "file_errors": self.file_errors,
            "since": None if self.since is None else ts_text(self.since),
            "by": self.by,
            "lines": self.lines,
            "corrupt": self.corrupt,
            "before_since": self.before_since,
            "records": sum(g.requests for g in self.groups.values()),
            "cost_usd": self.costs(),
            "percentiles": {
                "method": "nearest-rank",
                "exact_up_to": EXACT_LIMIT,
                "relative_error": RELATIVE_ERROR,
            },
            "groups": [{"value": value, **g.to_dict()} for value, g in self.ordered_groups()],
        }


def summarise(paths: list[Path], since: datetime | None = None, by: str | None = None) -> Summary:
    """Read every file in `paths` once, line by line, into a `Summary`.

    Error handling: a file that cannot be opened, or whose gzip stream is damaged, is named in
    `file_errors` and the figures keep what was read before the damage; nothing here is fatal.
    """
    summary = Summary(since=since, by=by)
    for path in paths:
        try:
            if since is not None and path.stat().st_mtime < since.timestamp():
                # Every record was written, so stamped, before the file's last change.
                summary.files_skipped.append(path)
                continue
            with open_log(path) as file:
                summary.files_read.append(path)
                _read_lines(file, summary)
        except (OSError, EOFError, zlib.error) as exc:
            summary.file_errors.append(f"{path}: {exc}")
    return summary


def _read_lines(file: Iterable[bytes], summary: Summary) -> None:
    # The hot loop of a 1M-line run: counters are locals and written back once, in `finally`, so
    # that the lines read before a damaged gzip stream still count.
    since = None if summary.since is None else ts_text(summary.since)
    by, groups = summary.by, summary.groups
    lines = corrupt = before = 0
    try:
        for line in file:
            lines += 1
            try:
                rec = parse_line(line)
                if since is not None:
                    ts = rec.get("ts")
                    if not isinstance(ts, str):
                        raise TypeError("no ts")
                    if ts < since:
                        before += 1
                        continue
                value = rec.get(by) if by is not None else None
                group = groups.get(value)
                if group is None:
                    group = groups[value] = GroupStats()
                group.add(rec)
            except (ValueError, TypeError):
                if line.strip():  # a blank line is not a record, nor a broken one
                    corrupt += 1
    finally:
        summary.lines += lines
        summary.corrupt += corrupt
        summary.before_since += before


def ts_text(when: datetime) -> str:
    """`when` in the `ts` format (`edge.record.utc_now_iso`): text order is time order."""
    return when.astimezone(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")
