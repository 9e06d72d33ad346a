"""`Saved`: a small file of the edge's own state (its bans, its keys' budget spend), kept on disk.

Both are tables the event loop owns and changes on the request path, and both must survive a
restart. So the same rules for both: a change marks the table dirty; `run_saver()` writes it
at most once per interval, off the event loop, as a temporary file renamed over the old one
(`shared.atomic.replace_file`, mode 0600); `close()` at shutdown lets a write under way finish
and saves what changed since; a failing disk is logged, never raised; a file that cannot be read
back at start is copied aside to `<path>.broken` (which no save touches) for the operator.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from pathlib import Path

import structlog

from shared.atomic import replace_file

log = structlog.get_logger(__name__)


class Saved:
    """The saving of one table: `snapshot()` gives its bytes (on the loop's thread)."""

    def __init__(
        self, path: Path | None, what: str, snapshot: Callable[[], bytes], interval: float
    ) -> None:
        self.path = path
        self._what = what  # the log events' prefix: "bans", "budgets"
        self._snapshot = snapshot
        self._interval = interval
        self._dirty = asyncio.Event()
        self._writing: asyncio.Future[None] | None = None
        self.saves = 0

    def changed(self) -> None:
        self._dirty.set()

    @property
    def dirty(self) -> bool:
        return self._dirty.is_set()

    def snapshot(self) -> bytes:
        """The table's bytes now; it is clean until the next change."""
        self._dirty.clear()
        return self._snapshot()

    def keep_aside(self, raw: bytes) -> str | None:
        """Copy the file as read to `<path>.broken`; its path, or None."""
        assert self.path is not None
        aside = self.path.with_name(self.path.name + ".broken")
        try:
            replace_file(aside, raw, 0o600)
        except OSError as exc:
            log.error(f"{self._what}.keep_aside_failed", path=str(aside), error=str(exc))
            return None
        return str(aside)

    def write(self, data: bytes) -> None:
        """Replace the file with `data` atomically (blocking: run it in a thread)."""
        if self.path is None:
            return
        replace_file(self.path, data, 0o600)
        self.saves += 1

    async def save(self) -> None:
        """Write the table now, off the event loop; a failing disk is logged, never raised.

        The write is shielded: cancelling the saver (at shutdown) does not abandon a write under
        way in its thread, and `close()` waits for it before the final save.
        """
        if self.path is None:
            self._dirty.clear()
            return
        self._writing = asyncio.ensure_future(self._write_logged(self.snapshot()))
        await asyncio.shield(self._writing)

    async def _write_logged(self, data: bytes) -> None:
        try:
            await asyncio.to_thread(self.write, data)
        except OSError as exc:
            log.error(f"{self._what}.save_failed", path=str(self.path), error=str(exc))

    async def close(self) -> None:
        """At shutdown: let a write under way finish, then save what changed since."""
        if self._writing is not None:
            await self._writing
        if self.dirty:
            await self.save()

    async def run_saver(self) -> None:
        """Save whenever the table changed, at most once per interval, until cancelled."""
        while True:
            await self._dirty.wait()
            await self.save()
            await asyncio.sleep(self._interval)  # pacing, not synchronisation
