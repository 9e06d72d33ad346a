"""Token budgets: what each key has spent in the current day or month, kept across restarts.

A key's `budget` (`edge.policy.keys.Budget`) caps the tokens (prompt + generated, the figure the
guard charges to its tpm) it may use per UTC calendar day or month, so that a runaway script
cannot burn a month of GPU. The guard asks `spent()` before it admits a request and `charge()`s
the answer's tokens after it: a request admitted just under the budget may overshoot it by its
own size, which is the price of counting real tokens instead of guessing them up front.

The guard sees a `BudgetStore`, two synchronous calls, so that a store shared by several edges
(Redis) can replace `LocalBudgets`, the edge's own: a table in memory, saved to `path` (in the
state directory) by `run_saver()` at most every `_SAVE_INTERVAL_S` seconds when it changed and
at shutdown (`close()`), atomically, and read at start, so a restart does not hand a key a fresh
month. A crash loses at most the last few seconds of spend. Periods that have ended are dropped
when the file is read and whenever it is written. A file that does not parse is copied to
`<path>.broken`, logged, and the edge starts with no spend: an operator's edit gone wrong must
not stop the edge, and the copy keeps the figures for a look.
"""

from __future__ import annotations

import calendar
import re
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta
from pathlib import Path
from typing import Literal, Protocol

import orjson
import structlog

from edge.policy.saved import Saved
from shared.errors import ConfigError

log = structlog.get_logger(__name__)

PeriodKind = Literal["day", "month"]
# Seconds between two writes of the spend file while answers keep coming: a crash loses at
# most this much spend, and a busy edge writes a few hundred bytes this often, not per answer.
_SAVE_INTERVAL_S = 5.0
_LABEL = re.compile(r"^(\d{4})-(\d{2})(?:-(\d{2}))?$")


@dataclass(frozen=True, slots=True)
class Period:
    """One budget period: a UTC calendar day (`label` 2026-11-22) or month (2026-11)."""

    kind: PeriodKind
    start: datetime
    end: datetime  # the next period's start: when the budget resets

    @property
    def label(self) -> str:
        return self.start.strftime("%Y-%m-%d" if self.kind == "day" else "%Y-%m")

    @classmethod
    def current(cls, kind: PeriodKind, now: float) -> Period:
        """The period of `kind` that holds `now` (Unix seconds)."""
        moment = datetime.fromtimestamp(now, UTC)
        if kind == "day":
            start = datetime.combine(moment.date(), datetime.min.time(), UTC)
            return cls(kind, start, start + timedelta(days=1))
        start = datetime(moment.year, moment.month, 1, tzinfo=UTC)
        days = calendar.monthrange(moment.year, moment.month)[1]
        return cls(kind, start, start + timedelta(days=days))

    @classmethod
    def parse(cls, label: str) -> Period | None:
        """The period a label names; None for anything else."""
        match = _LABEL.fullmatch(label)
        if match is None:
            return None
        year, month, day = match.groups()
        try:
            start = date(int(year), int(month), int(day or 1))
        except ValueError:
            return None
        moment = datetime.combine(start, datetime.min.time(), UTC).timestamp()
        return cls.current("day" if day else "month", moment)


class BudgetStore(Protocol):
    """What the guard asks of a spend store: synchronous, on the request path."""

    def spent(self, key_name: str, period: Period) -> int: ...
    def charge(self, key_name: str, period: Period, tokens: int) -> None: ...


Spend = dict[str, dict[str, int]]  # key name -> period label -> tokens


class LocalBudgets:
    """The spend of this edge's keys, in memory and in one file (see the module doc)."""

    def __init__(self, path: Path | None, clock: Callable[[], float] = time.time) -> None:
        self.path = path
        self.clock = clock
        self._spent: Spend = {}
        self.saved = Saved(path, "budgets", self._bytes, _SAVE_INTERVAL_S)

    def spent(self, key_name: str, period: Period) -> int:
        return self._spent.get(key_name, {}).get(period.label, 0)

    def charge(self, key_name: str, period: Period, tokens: int) -> None:
        if tokens <= 0:
            return
        periods = self._spent.setdefault(key_name, {})
        periods[period.label] = periods.get(period.label, 0) + tokens
        self.saved.changed()

    def load(self) -> None:
        """Read the spend saved by an earlier run, its ended periods left out.

        Error handling: raises `ConfigError` when `path` is there and is not a regular file (a
        FIFO would block the edge); a file that cannot be read or parsed is logged and kept
        aside (module doc).
        """
        if self.path is None:
            return
        if self.path.exists() and not self.path.is_file():
            raise ConfigError(
                f"the budgets file {self.path} is not a regular file; remove it, or point "
                "BACKHAUL_EDGE_BUDGETS_PATH at a file the edge may create"
            )
        try:
            raw = self.path.read_bytes()
        except FileNotFoundError:
            return
        except OSError as exc:
            log.error("budgets.load_failed", path=str(self.path), error=str(exc))
            return
        try:
            self._spent = current_spend(parse_spend(raw), self.clock())
        except ValueError as exc:
            log.error("budgets.load_failed", path=str(self.path), error=str(exc),
                      kept=self.saved.keep_aside(raw))  # fmt: skip
            return
        if self._spent:
            log.info("budgets.loaded", path=str(self.path), keys=len(self._spent))

    def _bytes(self) -> bytes:
        """The live spend as the file's bytes (ended periods dropped from memory too)."""
        self._spent = current_spend(self._spent, self.clock())
        return orjson.dumps({"version": 1, "spent": self._spent})

    async def close(self) -> None:
        """At shutdown: the last spend saved (`Saved.close`)."""
        await self.saved.close()

    async def run_saver(self) -> None:
        await self.saved.run_saver()


def parse_spend(raw: bytes) -> Spend:
    """The spend table of a budgets file's bytes.

    Error handling: raises `ValueError` saying what is wrong; an entry that is not a key name,
    a period label and a whole number of tokens is wrong.
    """
    data = orjson.loads(raw)
    spent = data.get("spent") if isinstance(data, dict) else None
    if not isinstance(spent, dict):
        raise ValueError("not a budgets file: no 'spent' object")
    table: Spend = {}
    for name, periods in spent.items():
        if not isinstance(periods, dict):
            raise ValueError(f"'spent.{name}' is not an object")
        for label, tokens in periods.items():
            if Period.parse(label) is None:
                raise ValueError(f"'spent.{name}.{label}' is not a day or month")
            if isinstance(tokens, bool) or not isinstance(tokens, int) or tokens < 0:
                raise ValueError(f"'spent.{name}.{label}' is not a number of tokens")
        table[name] = dict(periods)
    return table


def current_spend(spend: Mapping[str, Mapping[str, int]], now: float) -> Spend:
    """`spend` without the periods that ended before `now` (and keys left with none)."""
    kept: Spend = {}
    for name, periods in spend.items():
        live = {label: n for label, n in periods.items() if _live(label, now)}
        if live:
            kept[name] = live
    return kept


def _live(label: str, now: float) -> bool:
    period = Period.parse(label)
    return period is not None and period.end.timestamp() > now


def read_spend(path: Path) -> Spend:
    """The spend in the file at `path`, for `backhaul-edge keys list`; none yet is none.

    Error handling: raises `ConfigError` when the file cannot be read or parsed.
    """
    if path.exists() and not path.is_file():
        raise ConfigError(f"the budgets file {path} is not a regular file")
    try:
        return parse_spend(path.read_bytes())
    except FileNotFoundError:
        return {}
    except OSError as exc:
        raise ConfigError(f"cannot read the budgets file {path}: {exc.strerror}") from exc
    except ValueError as exc:
        raise ConfigError(f"the budgets file {path} is invalid: {exc}") from exc
