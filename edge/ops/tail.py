"""`backhaul-edge tail`: follow the telemetry log live, one compact line per request.

Shows the last N records, then follows the file across rotation and truncation like `tail -F`
(`edge.ops.logfiles.LogFollower`, polling every quarter second: the log is written at most a few
hundred times a second and a poll is one `read` and one `stat`). Each line holds time (UTC),
status, feature or route, model, key, tokens in->out, tok/s and elapsed, then the error type or
outcome of a failure; on a terminal the status is coloured by class (2xx green, 3xx cyan, 4xx
yellow, 5xx red, a non-`ok` outcome magenta). Notices (rotated, truncated, corrupt line) go to
stderr so that stdout stays one line per request.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TextIO

from edge.ops.logfiles import DEFAULT_PATH, LogFollower
from edge.record import parse_line
from shared.cli import Subparsers, add_command

DESCRIPTION = """\
Show the last N records of the edge's JSONL telemetry log, then follow it across rotation and
truncation like `tail -F`: one line per request with time (UTC), status, feature or route, model,
key, tokens in->out, tok/s and elapsed, then the error type or outcome of a failure. Coloured by
status class on a terminal, plain otherwise. Notices (rotated, truncated, a corrupt line) go to
stderr."""

# Seconds between polls: fast enough to feel live, slow enough to cost nothing while idle.
POLL_INTERVAL_S = 0.25
_COLOURS = {2: "32", 3: "36", 4: "33", 5: "31"}  # ANSI: green, cyan, yellow, red
_FAILURE_COLOUR = "35"  # magenta: a request that failed after a 2xx (e.g. client_gone mid-stream)


def never() -> bool:
    """The default stop condition: follow until interrupted."""
    return False


def register(subparsers: Subparsers) -> None:
    parser = add_command(subparsers, "tail", "follow the telemetry log", DESCRIPTION)
    parser.add_argument(
        "file", nargs="?", type=Path, default=DEFAULT_PATH, help=f"default: {DEFAULT_PATH}"
    )
    parser.add_argument(
        "--errors", action="store_true", help="only failures: status >= 400 or outcome not ok"
    )
    parser.add_argument(
        "-n", "--lines", type=int, default=10, metavar="N", help="records shown first (default 10)"
    )
    parser.add_argument("--no-follow", action="store_true", help="show the last N records and exit")
    parser.add_argument(
        "--color",
        choices=("auto", "always", "never"),
        default="auto",
        help="colour the status (auto: when stdout is a terminal)",
    )
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    colour = args.color == "always" or (args.color == "auto" and sys.stdout.isatty())
    if args.no_follow and not args.file.is_file():
        print(f"backhaul-edge tail: {args.file}: no such file", file=sys.stderr)
        return 1
    try:
        tail_log(
            args.file,
            out=sys.stdout,
            notice=lambda message: print(f"tail: {message}", file=sys.stderr, flush=True),
            count=args.lines,
            errors_only=args.errors,
            colour=colour,
            follow=not args.no_follow,
        )
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        # The reader (`| head`) went away: stop quietly, and keep the interpreter's final flush
        # of stdout from raising again on the way out.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    return 0


def tail_log(
    path: Path,
    *,
    out: TextIO,
    notice: Callable[[str], None],
    count: int = 10,
    errors_only: bool = False,
    colour: bool = False,
    follow: bool = True,
    interval: float = POLL_INTERVAL_S,
    sleep: Callable[[float], None] = time.sleep,
    stop: Callable[[], bool] = never,
) -> None:
    """Write the last `count` records of `path`, then (if `follow`) each new one, to `out`.

    `sleep` and `stop` are the follow loop's: tests pass a `sleep` that changes the file and a
    `stop` that ends the loop, and drive it without waiting on the clock.
    Resource handling: the follower's file is closed on the way out, however it ends.
    """

    def keep(line: bytes) -> bool:
        return not errors_only or is_failure(line)

    def show(lines: list[bytes]) -> None:
        for line in lines:
            try:
                rec = parse_line(line)
            except ValueError:
                notice(f"skipped a line that is not a record ({len(line)} bytes)")
                continue
            if not errors_only or _failed(rec):
                out.write(format_record(rec, colour=colour) + "\n")
        out.flush()

    follower = LogFollower(path, notice)
    try:
        show(follower.start(count, keep))
        if follow:
            while True:
                show(follower.poll())
                if stop():
                    return
                sleep(interval)
    finally:
        follower.close()


def is_failure(line: bytes) -> bool:
    """Whether a raw line is a failed request; an unreadable line counts, so that it is reported."""
    try:
        return _failed(parse_line(line))
    except ValueError:
        return True


def _failed(rec: dict[str, Any]) -> bool:
    status = rec.get("status")
    return not isinstance(status, int) or status >= 400 or rec.get("outcome") != "ok"


def format_record(rec: dict[str, Any], *, colour: bool = False) -> str:
    """One compact line for a record; a field that is missing or of the wrong type shows `-`."""
    ts = rec.get("ts")
    when = ts[11:23] if isinstance(ts, str) and len(ts) >= 19 else "-"
    status = rec.get("status")
    status_text = f"{status:>3}" if isinstance(status, int) else "  -"
    where = rec.get("feature") or rec.get("route") or "-"
    tokens_in, tokens_out = rec.get("prompt_tokens"), rec.get("tokens")
    tokens = "-"
    if _is_number(tokens_in) or _is_number(tokens_out):
        tokens = f"{_count(tokens_in)}->{_count(tokens_out)} tok"
    tps = rec.get("tok_per_s")
    speed = f"{tps:.1f} tok/s" if _is_number(tps) else "- tok/s"
    failure = ""
    if _failed(rec):
        failure = " " + str(rec.get("type") or rec.get("outcome") or "failed")
    if colour:
        code = _colour(status, rec.get("outcome"))
        status_text = f"\x1b[{code}m{status_text}\x1b[0m"
        failure = f"\x1b[{code}m{failure}\x1b[0m" if failure else ""
    return (
        f"{when:<12} {status_text} {where!s:<20} {rec.get('model') or '-'!s:<18} "
        f"{rec.get('key') or '-'!s:<12} {tokens:>14} {speed:>12} "
        f"{_elapsed(rec.get('elapsed_ms')):>8}{failure}"
    )


def _colour(status: object, outcome: object) -> str:
    if isinstance(status, int) and 200 <= status < 300 and outcome != "ok":
        return _FAILURE_COLOUR
    return _COLOURS.get(status // 100 if isinstance(status, int) else 0, _FAILURE_COLOUR)


def _is_number(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _count(value: object) -> str:
    return str(value) if _is_number(value) else "-"


def _elapsed(ms: object) -> str:
    if not _is_number(ms):
        return "-"
    assert isinstance(ms, int | float)
    return f"{ms / 1000:.2f}s" if ms >= 1000 else f"{ms:.0f}ms"
