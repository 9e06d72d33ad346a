"""Replacing a small file atomically: a reader sees the old content or the new, never half.

The edge's keys and ban list and the agent's status file are all written this way: a temporary
file beside the target, written whole, then `os.replace` (a rename, atomic on POSIX).
"""

from __future__ import annotations

import os
from pathlib import Path


def replace_file(
    path: Path, data: bytes, mode: int = 0o600, *, durable: bool = True, keep_owner: bool = False
) -> None:
    """Make `path` hold `data`, atomically.

    `durable` fsyncs the data before the rename (it survives a power cut, at the cost of a
    disk flush). `keep_owner`, when running as root, gives the new file the old file's owner
    (or its directory's): root editing a file that a service user must go on reading.

    Error handling: an `OSError` propagates; the target is then unchanged.
    """
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    try:
        if keep_owner and os.geteuid() == 0:
            st = (path if path.exists() else path.parent).stat()
            os.fchown(fd, st.st_uid, st.st_gid)
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view) :]
        if durable:
            os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)
