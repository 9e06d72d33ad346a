"""A built-in fail2ban: addresses that keep failing authentication are refused for a while.

`threshold` failed authentications from one address within `window` seconds ban it for `period`
seconds: every request from it is answered 403 `banned` (with `Retry-After`) before anything
else is looked at, so it never reaches the model server. A failure is a key that was presented
and did not authenticate (wrong, malformed, revoked, expired): a request without any key is
refused 401 but is not a guess, and is not counted.

The ban list survives a restart: `run_saver()` (a task in the app's cleanup context) writes it
to `path` whenever it changed, at most once per `_SAVE_INTERVAL_S`, from a thread, as a temporary
file then `os.replace`, so a crash leaves the old list or the new one, never half of one; the
cleanup writes it a last time. Every change happens on the event loop, so concurrent failures
need no lock, and one writer means no two saves race. Both tables are bounded: at most
`max_entries` bans (the oldest evicted first) and as many addresses with recent failures.

Times are wall-clock seconds (`clock`, injectable) because a ban's end must mean the same after
a restart.
"""

from __future__ import annotations

import asyncio
import time
from collections import OrderedDict, deque
from collections.abc import Callable
from pathlib import Path

import orjson
import structlog

from shared.atomic import replace_file

log = structlog.get_logger(__name__)

# Seconds between two writes of the ban file while bans keep coming (an attack from many
# addresses): the list on disk is at most this old, and the disk is not hammered.
_SAVE_INTERVAL_S = 1.0


class BanList:
    """Failed-auth counters and bans by client address."""

    def __init__(
        self,
        path: Path | None,
        threshold: int = 10,
        window: float = 600.0,
        period: float = 3600.0,
        max_entries: int = 10_000,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.path = path
        self.threshold = threshold
        self.window = window
        self.period = period
        self.max_entries = max_entries
        self.clock = clock
        self._bans: OrderedDict[str, float] = OrderedDict()  # address -> end (epoch s)
        self._failures: OrderedDict[str, deque[float]] = OrderedDict()
        self._dirty = asyncio.Event()
        self.saves = 0

    def __len__(self) -> int:
        return len(self._bans)

    def banned_for(self, address: str | None) -> float | None:
        """Seconds left on `address`'s ban, or None when it is not banned."""
        if address is None or not self._bans:
            return None
        end = self._bans.get(address)
        if end is None:
            return None
        left = end - self.clock()
        if left <= 0:
            del self._bans[address]
            self._dirty.set()
            return None
        return left

    def fail(self, address: str | None) -> bool:
        """Count one failed authentication; True when it got `address` banned."""
        if address is None:
            return False
        now = self.clock()
        times = self._failures.get(address)
        if times is None:
            if len(self._failures) >= self.max_entries:
                self._failures.popitem(last=False)
            times = self._failures[address] = deque(maxlen=self.threshold)
        else:
            self._failures.move_to_end(address)
        times.append(now)
        while times and times[0] <= now - self.window:
            times.popleft()
        if len(times) < self.threshold:
            return False
        del self._failures[address]
        self.ban(address, now + self.period)
        log.warning(
            "auth.banned",
            client=address,
            failures=self.threshold,
            window_s=self.window,
            period_s=self.period,
        )
        return True

    def ban(self, address: str, until: float) -> None:
        self._bans.pop(address, None)
        while len(self._bans) >= self.max_entries:
            self._bans.popitem(last=False)  # the oldest ban: it ends first
        self._bans[address] = until
        self._dirty.set()

    def load(self) -> None:
        """Read the bans saved by an earlier run; a missing or broken file is no bans."""
        if self.path is None:
            return
        try:
            data = orjson.loads(self.path.read_bytes())
            bans = data["bans"]
            if not isinstance(bans, dict):
                raise TypeError("'bans' is not an object")
            now = self.clock()
            live = sorted((float(end), str(addr)) for addr, end in bans.items() if end > now)
        except FileNotFoundError:
            return
        except (OSError, ValueError, KeyError, TypeError) as exc:
            log.error("bans.load_failed", path=str(self.path), error=str(exc))
            return
        for end, address in live[-self.max_entries :]:
            self._bans[address] = end
        if live:
            log.info("bans.loaded", path=str(self.path), bans=len(self._bans))

    def snapshot(self) -> bytes:
        """The live bans as the file's bytes; taken on the event loop, which owns the tables."""
        self._dirty.clear()
        now = self.clock()
        bans = {address: end for address, end in self._bans.items() if end > now}
        return orjson.dumps({"version": 1, "bans": bans})

    def write(self, data: bytes) -> None:
        """Replace the file with `data` atomically (blocking: run it in a thread)."""
        if self.path is None:
            return
        replace_file(self.path, data, 0o600)
        self.saves += 1

    async def save(self) -> None:
        """Write the list now, off the event loop; a failing disk is logged, never raised."""
        if self.path is None:
            self._dirty.clear()
            return
        try:
            await asyncio.to_thread(self.write, self.snapshot())
        except OSError as exc:
            log.error("bans.save_failed", path=str(self.path), error=str(exc))

    @property
    def dirty(self) -> bool:
        return self._dirty.is_set()

    async def run_saver(self) -> None:
        """Save whenever the list changed, at most once per `_SAVE_INTERVAL_S`, until cancelled."""
        while True:
            await self._dirty.wait()
            await self.save()
            await asyncio.sleep(_SAVE_INTERVAL_S)  # pacing, not synchronisation
