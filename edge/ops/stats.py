"""`backhaul-edge stats`: the command line and the report as a table or JSON.

The reading and the figures are `edge.ops.summary`'s (one streaming pass, bounded memory); the
`--since` time is `edge.ops.timeparse`'s; which files are read is `edge.ops.logfiles`'s rule (each
FILE with its rotated `FILE.N` and `FILE.N.gz`, oldest first). Exit status: 0 when the report was
printed, 1 when there was no log to read, 2 on a usage error.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

import orjson

from edge.ops.logfiles import DEFAULT_PATH, expand_paths
from edge.ops.quantiles import EXACT_LIMIT, RELATIVE_ERROR
from edge.ops.summary import Summary, summarise, ts_text
from edge.ops.timeparse import time_arg
from shared.cli import Subparsers, add_command

DESCRIPTION = """\
Summarise the edge's JSONL telemetry log: requests, errors by type, elapsed and TTFB p50/p95/p99,
tok/s p50/p10, tokens in and out, queue time p50/p99, clients gone, and where answers carry a
cost_usd, cloud spend and what local answers saved; one table per group with --by.

Each FILE is read with its rotated siblings FILE.N and FILE.N.gz (oldest first); gzip'd files are
recognised by content. Corrupt or truncated lines are counted and skipped. Percentiles are exact
up to 8,192 values per figure and within 1 % beyond (marked ~)."""

GROUP_FIELDS = ("model", "key", "feature", "route", "status", "agent", "served_by")


def register(subparsers: Subparsers) -> None:
    parser = add_command(subparsers, "stats", "summarise the telemetry log", DESCRIPTION)
    parser.add_argument(
        "files",
        nargs="*",
        type=Path,
        metavar="FILE",
        help=f"JSONL log(s); FILE.N and FILE.N.gz are read too (default: {DEFAULT_PATH})",
    )
    parser.add_argument(
        "--since",
        type=time_arg(ago=True),
        help="only records from then on: 30m, 1h, 2d, 1w ago, a date (UTC) or an ISO time",
    )
    parser.add_argument("--by", choices=GROUP_FIELDS, help="one table per value of this field")
    parser.add_argument("--json", action="store_true", help="print JSON for scripts")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    given = args.files or [DEFAULT_PATH]
    paths = expand_paths(given)
    if not paths:
        names = ", ".join(str(p) for p in given)
        print(f"backhaul-edge stats: no log found at {names}", file=sys.stderr)
        return 1
    summary = summarise(paths, since=args.since, by=args.by)
    if args.json:
        sys.stdout.write(orjson.dumps(summary.to_dict(), option=orjson.OPT_INDENT_2).decode())
        sys.stdout.write("\n")
    else:
        sys.stdout.write(render_text(summary))
    sys.stdout.flush()
    # Every file skipped by --since is a normal, empty report; every file unreadable is not.
    return 1 if summary.file_errors and not summary.files_read else 0


def render_text(summary: Summary) -> str:
    """The human-readable report: what was read, then one small table per group."""
    out = [f"files: {', '.join(str(p) for p in summary.files_read) or '(none)'}"]
    if summary.files_skipped:
        names = ", ".join(str(p) for p in summary.files_skipped)
        out.append(f"skipped (last written before --since): {names}")
    out.extend(f"error: {message}" for message in summary.file_errors)
    read = f"lines: {summary.lines:,} read, {summary.corrupt:,} corrupt or truncated (skipped)"
    if summary.since is not None:
        read += f", {summary.before_since:,} before {ts_text(summary.since)}"
    out.append(read)
    if not summary.groups:
        out.append("no records")
    costs = summary.costs()
    for value, group in summary.ordered_groups():
        d = group.to_dict()
        label = "all records" if summary.by is None else f"{summary.by} {_label(value)}"
        errors = d["errors"]
        by_type = ", ".join(f"{t} {n:,}" for t, n in group.errors.most_common())
        out += [
            "",
            label,
            f"  {'requests':<14}{group.requests:,}",
            f"  {'errors':<14}{errors['total']:,}" + (f"  ({by_type})" if by_type else ""),
            f"  {'client gone':<14}{group.client_gone:,}",
            f"  {'elapsed ms':<14}{_figures(d['elapsed_ms'])}",
            f"  {'ttfb ms':<14}{_figures(d['ttfb_ms'])}",
            f"  {'tok/s':<14}{_figures(d['tok_per_s'])}",
            f"  {'tokens':<14}in {group.prompt_tokens:,}  out {group.tokens:,}",
            f"  {'queue ms':<14}{_figures(d['queue_ms'])}",
        ]
        if costs["n"]:
            out.append(f"  {'cost usd':<14}{_money(d['cost_usd'])}")
    approximate = any(
        not s.exact
        for g in summary.groups.values()
        for s in (g.elapsed, g.ttfb, g.tok_per_s, g.queue)
    )
    if approximate:
        out += ["", f"(~: beyond {EXACT_LIMIT:,} values, within {RELATIVE_ERROR:.0%})"]
    if costs["n"]:
        cloud, saved = costs["cloud_usd"], costs["saved_usd"]
        out += ["", f"cloud spend ${cloud:,.2f}; local answers saved ${saved:,.2f}"]
    return "\n".join(out) + "\n"


def _label(value: Any) -> str:
    return "(none)" if value is None else str(value)


def _money(c: dict[str, Any]) -> str:
    # Four decimals: one group's figures may be a few cents; the closing total rounds to cents.
    return f"cloud ${c['cloud_usd']:,.4f}   saved ${c['saved_usd']:,.4f}   (n {c['n']:,})"


def _figures(p: dict[str, Any]) -> str:
    mark = "" if p["exact"] else "~"
    cells = [
        f"{name} {'-' if v is None else f'{mark}{v:,.1f}'}"
        for name, v in p.items()
        if name not in ("n", "exact")
    ]
    return "   ".join(cells) + f"   (n {p['n']:,})"
