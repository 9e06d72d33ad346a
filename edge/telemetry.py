"""The JSONL telemetry writer: one line per request, never blocking the event loop.

The request path serialises its `RequestRecord` (orjson, microseconds) and hands the bytes to a
queue; one writer thread appends them to the file with `os.write` on an `O_APPEND` descriptor, so
every line is complete and on disk (in the page cache) as soon as it is written, for operators
who `tail -F` it. The writer rotates the file by size (`telemetry.jsonl` -> `.1` -> `.2` ...) and
reopens it on `reopen()` (SIGHUP, for logrotate). A failing disk is logged, at most once a
minute, and counted; serving goes on. The path must be a regular file: anything else (a FIFO
would block the thread, and shutdown with it) is refused at start, and at each open after. So is
a path whose directory does not exist (the default state directory on a machine without the
systemd unit, say): every line would be lost.

Resource handling: the thread and the file descriptor belong to `TelemetryWriter`; `close()`
writes what is queued, then stops the thread.
"""

from __future__ import annotations

import asyncio
import errno
import os
import queue
import stat
import threading
import time
from pathlib import Path

import structlog

from edge.record import RequestRecord
from shared.errors import ConfigError

log = structlog.get_logger(__name__)

# Longest a line waits on the loop before the writer thread gets it (s).
_HANDOFF_S = 0.01
# Seconds between two "telemetry.write_failed" log lines while the disk keeps failing.
_FAILURE_LOG_INTERVAL_S = 60.0


# O_NONBLOCK: a FIFO at the path fails the open (no reader) or the check after it, instead of
# blocking the writer thread, and with it shutdown, which waits for that thread; on a regular
# file it changes nothing.
_OPEN_FLAGS = os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC | os.O_NOCTTY | os.O_NONBLOCK


def _not_regular(path: Path, mode: int) -> str:
    kind = "a FIFO" if stat.S_ISFIFO(mode) else "a directory" if stat.S_ISDIR(mode) else "special"
    return (
        f"the telemetry path {path} is not a regular file ({kind}); "
        "point BACKHAUL_EDGE_TELEMETRY_PATH at a file"
    )


def check_path(path: Path | None) -> None:
    """Refuse, at start, a telemetry path that is there and is not a regular file, or whose
    directory is not there.

    Error handling: raises `ConfigError`. Later (a FIFO put there while serving, then SIGHUP),
    the writer refuses it at its next open, and logs it like any failing disk.
    """
    if path is None:
        return
    try:
        path.parent.stat()
    except (FileNotFoundError, NotADirectoryError):
        raise ConfigError(
            f"the telemetry path {path} is in a directory that does not exist; create it, or "
            "set BACKHAUL_EDGE_STATE_DIR (or BACKHAUL_EDGE_TELEMETRY_PATH) to one that does"
        ) from None
    except OSError:  # not ours to see: the first write says why
        pass
    try:
        mode = path.stat().st_mode
    except OSError:  # absent (it is created), or not ours to see: the first write says why
        return
    if not stat.S_ISREG(mode):
        raise ConfigError(_not_regular(path, mode))


class TelemetryWriter:
    """Appends JSON lines to `path` from a background thread; `path=None` keeps them in memory
    only for `flush()` accounting (telemetry off)."""

    def __init__(self, path: Path | None, max_bytes: int = 0, backups: int = 5) -> None:
        """Error handling: raises `ConfigError` when `path` is not a regular file."""
        check_path(path)
        self.path = path
        self.max_bytes = max_bytes
        self.backups = backups
        self.written = 0
        self.dropped = 0
        self._queue: queue.SimpleQueue[bytes | list[bytes] | threading.Event | None] = (
            queue.SimpleQueue()
        )
        self._pending: list[bytes] = []  # lines not yet handed to the thread
        self._fd: int | None = None
        self._size = 0
        self._reopen = False
        self._last_failure_log = 0.0
        self._thread = threading.Thread(target=self._run, name="telemetry-writer", daemon=True)
        self._thread.start()

    def write(self, record: RequestRecord) -> None:
        """Queue one record; returns at once.

        On an event loop, lines are handed to the thread in batches at most `_HANDOFF_S`
        apart: waking a thread for every request costs more than the write itself (a GIL
        hand-off each time), and 10 ms is nothing to an operator's `tail -F`.
        """
        line = record.to_json_line()
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            self._queue.put(line)
            return
        self._pending.append(line)
        if len(self._pending) == 1:
            loop.call_later(_HANDOFF_S, self._handoff)

    def _handoff(self) -> None:
        if self._pending:
            self._queue.put(self._pending)
            self._pending = []

    def reopen(self) -> None:
        """Close and reopen the file before the next line (after logrotate moved it)."""
        self._reopen = True

    def flush(self, timeout: float = 5.0) -> bool:
        """Block until every line queued so far is written; False if that took over `timeout`.

        Call it from the loop's thread (or with no loop running): it hands over pending lines.
        """
        self._handoff()
        return self._wait_written(timeout)

    def _wait_written(self, timeout: float = 5.0) -> bool:
        done = threading.Event()
        self._queue.put(done)
        return done.wait(timeout)

    async def wait_flushed(self) -> bool:
        """`flush()` without blocking the event loop."""
        self._handoff()
        return await asyncio.to_thread(self._wait_written)

    def close(self) -> None:
        """Write what is queued, stop the thread and close the file (from the loop's thread,
        or with no loop running)."""
        self._handoff()
        self._stop()

    async def aclose(self) -> None:
        """`close()` without blocking the event loop: pending lines are handed over here, on
        the loop's thread, so a hand-off never runs on two threads at once."""
        self._handoff()
        await asyncio.to_thread(self._stop)

    def _stop(self) -> None:
        self._queue.put(None)
        self._thread.join()

    def _run(self) -> None:
        while True:
            item = self._queue.get()
            batch: list[bytes] = []
            events: list[threading.Event] = []
            stop = False
            # Take everything already queued: under load one write() carries many lines.
            while True:
                if item is None:
                    stop = True
                elif isinstance(item, threading.Event):
                    events.append(item)
                elif isinstance(item, list):
                    batch.extend(item)
                else:
                    batch.append(item)
                try:
                    item = self._queue.get_nowait()
                except queue.Empty:
                    break
            if batch:
                self._append(batch)
            for event in events:
                event.set()
            if stop:
                self._close_fd()
                return

    def _append(self, lines: list[bytes]) -> None:
        if self.path is None:
            self.written += len(lines)
            return
        try:
            if self._reopen:
                self._reopen = False
                self._close_fd()
            if self._fd is None:
                self._open()
            pending: list[bytes] = []
            pending_size = 0
            for line in lines:
                over = self._size + pending_size + len(line) > self.max_bytes
                if self.max_bytes and over and self._size + pending_size > 0:
                    self._write(pending)
                    pending, pending_size = [], 0
                    self._rotate()
                    self._open()
                pending.append(line)
                pending_size += len(line)
            self._write(pending)
        except OSError as exc:
            self.dropped += len(lines)
            self._close_fd()
            now = time.monotonic()
            if now - self._last_failure_log >= _FAILURE_LOG_INTERVAL_S:
                self._last_failure_log = now
                log.error(
                    "telemetry.write_failed",
                    path=str(self.path),
                    error=str(exc),
                    dropped_total=self.dropped,
                )

    def _write(self, lines: list[bytes]) -> None:
        assert self._fd is not None
        view = memoryview(b"".join(lines))
        size = len(view)
        while view:
            n = os.write(self._fd, view)
            view = view[n:]
        self._size += size
        self.written += len(lines)

    def _open(self) -> None:
        assert self.path is not None
        try:
            fd = os.open(self.path, _OPEN_FLAGS, 0o640)
        except OSError as exc:
            if exc.errno == errno.ENXIO:  # a FIFO nobody reads, or a socket
                raise OSError(
                    exc.errno, _not_regular(self.path, os.stat(self.path).st_mode)
                ) from exc
            raise
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            os.close(fd)
            raise OSError(errno.EINVAL, _not_regular(self.path, st.st_mode))
        self._fd, self._size = fd, st.st_size

    def _close_fd(self) -> None:
        if self._fd is not None:
            fd, self._fd = self._fd, None
            os.close(fd)

    def _rotate(self) -> None:
        assert self.path is not None
        self._close_fd()
        if self.backups == 0:
            self.path.unlink(missing_ok=True)
            return
        name = self.path.name
        # An operator may gzip old files (`.2.gz`): they age and expire like the plain ones.
        for suffix in ("", ".gz"):
            self.path.with_name(f"{name}.{self.backups}{suffix}").unlink(missing_ok=True)
            for n in range(self.backups - 1, 0, -1):
                older = self.path.with_name(f"{name}.{n}{suffix}")
                if older.exists():
                    older.replace(self.path.with_name(f"{name}.{n + 1}{suffix}"))
        self.path.replace(self.path.with_name(f"{name}.1"))
        log.info("telemetry.rotated", path=str(self.path))
