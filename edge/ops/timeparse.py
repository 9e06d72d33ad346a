"""A time given on an operator's command line: `stats --since` and `keys add --expires`.

One parser for both, so that `2d`, `2026-11-20` and an ISO time mean the same thing to each: a
duration before or after now, midnight UTC of a date, or an ISO 8601 time (UTC when it has no
offset, like the telemetry's `ts`). `time_arg` wraps it as an argparse `type=`, so a bad value is
a usage error (exit 2) and not a traceback.
"""

from __future__ import annotations

import argparse
import re
from collections.abc import Callable
from datetime import UTC, date, datetime, timedelta

_RELATIVE = re.compile(r"(\d+)\s*([smhdw])")
_UNIT_SECONDS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}


def parse_since(text: str, now: datetime) -> datetime:
    """`30m`, `1h`, `2d`, `1w` before `now`; `2026-11-20` (midnight UTC); or an ISO 8601 time.

    A time without an offset is taken as UTC, like `ts`. Raises `ValueError` on anything else.
    """
    return parse_time(text, now, ago=True)


def parse_time(text: str, now: datetime, *, ago: bool, units: str = "smhdw") -> datetime:
    """A time given on a command line (`stats --since`, `keys add --expires`).

    `<n><unit>` for a unit in `units` (s, m, h, d, w) is that long before `now` when `ago`, else
    after it; `2026-11-20` is midnight UTC; anything else is an ISO 8601 time, UTC when it has no
    offset. Raises `ValueError` on anything else.
    """
    text = text.strip()
    if (match := _RELATIVE.fullmatch(text)) and match[2] in units:
        delta = timedelta(seconds=int(match[1]) * _UNIT_SECONDS[match[2]])
        return now - delta if ago else now + delta
    if len(text) == 10:
        day = date.fromisoformat(text)
        return datetime(day.year, day.month, day.day, tzinfo=UTC)
    when = datetime.fromisoformat(text)
    return when.replace(tzinfo=UTC) if when.tzinfo is None else when.astimezone(UTC)


def time_arg(*, ago: bool, units: str = "smhdw") -> Callable[[str], datetime]:
    """An argparse `type=` for `parse_time`, relative to when the command line is parsed."""

    def parse(text: str) -> datetime:
        try:
            return parse_time(text, datetime.now(UTC), ago=ago, units=units)
        except ValueError:
            message = f"not a duration, date or ISO time: {text!r}"
            raise argparse.ArgumentTypeError(message) from None

    return parse
