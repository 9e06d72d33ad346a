"""The telemetry log on disk: its rotated siblings, opening plain or gzip'd files, following it.

The edge rotates by renaming `telemetry.jsonl` to `.1`, `.1` to `.2` and so on (an operator or
logrotate may gzip the older ones to `.N.gz`). The rule the readers apply: every path given also
brings in its siblings named `PATH.N` and `PATH.N.gz` (N a number), read oldest first (largest N
first) and the path itself last. A file is gzip'd when it starts with the gzip magic bytes, whatever
its name. `LogFollower` is the `tail -F` half: each `poll()` reads what was appended, notices a
rename (a new inode at the path) or a truncation (the size fell below what it had read), drains
the old file and reopens; the caller owns the loop and its sleep. A truncation followed by more
writes than were read before it, all within one poll, looks like growth: `tail -F` has the same
blind spot. `DEFAULT_PATH` is where the edge writes the log unless told otherwise: the path every
reader falls back to.
"""

from __future__ import annotations

import gzip
import io
import os
import re
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import BinaryIO

from edge.settings import EdgeSettings

# The edge's default telemetry path: in its default state directory.
DEFAULT_PATH: Path = EdgeSettings.model_fields["telemetry_path"].get_default(
    call_default_factory=True,
    validated_data={"state_dir": EdgeSettings.model_fields["state_dir"].default},
)
GZIP_MAGIC = b"\x1f\x8b"
# Bytes read per poll and per backwards step: a few hundred records, one syscall.
CHUNK_BYTES = 64 * 1024
# A line without a newline this long is not a record being written but garbage: drop it so that a
# file of junk cannot grow the follower's buffer without bound (records are a few hundred bytes).
MAX_PARTIAL_BYTES = 1024 * 1024


def rotated_siblings(path: Path) -> list[Path]:
    """`PATH.N` and `PATH.N.gz` beside `path`, oldest (largest N) first."""
    pattern = re.compile(re.escape(path.name) + r"\.(\d+)(\.gz)?")
    try:
        names = os.listdir(path.parent)
    except OSError:  # a missing or unreadable directory: the path alone is reported missing
        return []
    found: list[tuple[int, str]] = []
    for name in names:
        match = pattern.fullmatch(name)
        if match:
            found.append((int(match[1]), name))
    found.sort(key=lambda item: (-item[0], item[1]))
    return [path.parent / name for _, name in found]


def expand_paths(paths: Iterable[Path]) -> list[Path]:
    """Each path's rotated siblings then the path itself, each file once, missing ones left out."""
    seen: set[Path] = set()
    result: list[Path] = []
    for path in paths:
        for candidate in [*rotated_siblings(path), path]:
            key = candidate.resolve()
            if key not in seen and candidate.is_file():
                seen.add(key)
                result.append(candidate)
    return result


def open_log(path: Path) -> io.BufferedIOBase:
    """Open a log for reading lines, decompressing it when it is gzip'd (by content, not name).

    Error handling: `OSError` when it cannot be opened; a damaged gzip stream raises `OSError` or
    `EOFError` later, while its lines are read.
    """
    raw = open(path, "rb")  # noqa: SIM115 - returned to the caller, who closes it
    try:
        magic = raw.read(len(GZIP_MAGIC))
        raw.seek(0)
    except OSError:
        raw.close()
        raise
    if magic != GZIP_MAGIC:
        return raw
    raw.close()
    return gzip.open(path, "rb")


def last_lines(
    file: BinaryIO, end: int, count: int, keep: Callable[[bytes], bool]
) -> tuple[list[bytes], int]:
    """The last `count` complete lines before offset `end` that `keep` accepts, oldest first.

    Reads backwards a chunk at a time, so showing the end of a 1 GB log costs a few reads. Returns
    the lines and the offset just past the last newline before `end`: a line still being written
    is left for the follower to read whole.
    """
    resume = _after_last_newline(file, end)
    lines: list[bytes] = []
    pos = resume
    # buf[:stop] is read but not yet split into lines; it always ends with a newline.
    buf, stop = b"", 0
    while len(lines) < count:
        newline = buf.rfind(b"\n", 0, stop - 1) if stop > 1 else -1
        if newline >= 0:
            line, stop = buf[newline + 1 : stop], newline + 1
        elif pos == 0:
            if stop > 1 and keep(buf[:stop]):
                lines.append(buf[:stop])
            break
        else:
            step = min(CHUNK_BYTES, pos)
            pos -= step
            file.seek(pos)
            buf = file.read(step) + buf[:stop]
            stop = len(buf)
            continue
        if line != b"\n" and keep(line):
            lines.append(line)
    lines.reverse()
    return lines, resume


def _after_last_newline(file: BinaryIO, end: int) -> int:
    pos = end
    while pos > 0:
        step = min(CHUNK_BYTES, pos)
        pos -= step
        file.seek(pos)
        newline = file.read(step).rfind(b"\n")
        if newline >= 0:
            return pos + newline + 1
    return 0


class LogFollower:
    """Follows one path across rotation and truncation, like `tail -F`, by polling.

    Resource handling: owns at most one open file at a time; `close()` releases it.
    Error handling: a missing file is waited for (`notice` says so once); lines are handed out
    only once complete, except a fragment left at the end of a file that was rotated away, which
    is handed out as it is (the reader counts it as corrupt).
    """

    def __init__(self, path: Path, notice: Callable[[str], None] = lambda _msg: None) -> None:
        self.path = path
        self._notice = notice
        self._file: BinaryIO | None = None
        self._identity: tuple[int, int] | None = None
        self._pos = 0
        self._partial = b""
        self._waiting = False

    def start(self, count: int, keep: Callable[[bytes], bool]) -> list[bytes]:
        """Open the file; return its last `count` lines that `keep` accepts, then follow on."""
        if not self._open(at_end=True):
            return []
        assert self._file is not None
        if count <= 0:
            return []
        lines, self._pos = last_lines(self._file, self._pos, count, keep)
        self._file.seek(self._pos)
        return lines

    def poll(self) -> list[bytes]:
        """One look at the file without waiting: the complete lines that appeared since the last."""
        lines = self._read_new()
        try:
            st = os.stat(self.path)
        except FileNotFoundError:
            # Renamed away and not recreated yet: the old handle was drained above.
            return lines
        if self._file is None:
            self._open(at_end=False)
        elif (st.st_dev, st.st_ino) != self._identity:
            # The writer may have added its last lines between our read and the stat.
            lines += self._read_new()
            lines += self._flush_partial()
            self._notice(f"{self.path}: rotated; following the new file")
            self._close()
            self._open(at_end=False)
        elif st.st_size < self._pos:
            self._notice(f"{self.path}: truncated; reading from the start")
            self._partial = b""
            self._pos = 0
            assert self._file is not None
            self._file.seek(0)
        lines += self._read_new()
        return lines

    def close(self) -> None:
        """Release the open file, if any."""
        self._close()

    def _open(self, *, at_end: bool) -> bool:
        try:
            file = open(self.path, "rb", buffering=0)  # noqa: SIM115 - closed by _close()
        except FileNotFoundError:
            if not self._waiting:
                self._notice(f"{self.path}: not there yet; waiting for it")
                self._waiting = True
            return False
        st = os.fstat(file.fileno())
        self._file, self._identity = file, (st.st_dev, st.st_ino)
        self._waiting = False
        self._partial = b""
        self._pos = st.st_size if at_end else 0
        file.seek(self._pos)
        return True

    def _close(self) -> None:
        if self._file is not None:
            self._file.close()
        self._file, self._identity = None, None

    def _read_new(self) -> list[bytes]:
        if self._file is None:
            return []
        chunks = [self._partial]
        while chunk := self._file.read(CHUNK_BYTES):
            chunks.append(chunk)
            self._pos += len(chunk)
        data = b"".join(chunks)
        cut = data.rfind(b"\n") + 1
        self._partial = data[cut:]
        if len(self._partial) > MAX_PARTIAL_BYTES:
            self._notice(f"{self.path}: dropped {len(self._partial)} bytes without a newline")
            self._partial = b""
        # Split on b"\n" alone, as the stats reader does: splitlines() would also cut at a b"\r".
        return [line + b"\n" for line in data[: cut - 1].split(b"\n")] if cut else []

    def _flush_partial(self) -> list[bytes]:
        fragment, self._partial = self._partial, b""
        return [fragment] if fragment else []
