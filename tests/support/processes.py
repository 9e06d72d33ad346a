"""`backhaul-edge serve` in a process of its own, as systemd runs it, for what an edge in the
test's event loop cannot show: READY=1 and the watchdog, signals and exit statuses, the
descriptor limit it starts with, and an event loop a FIFO could block (the test must not block
with it).

- `edge_process()`: the program on a free port, in front of a model server nobody runs, its
  files in `tmp_path` and its JSON log in `tmp_path/edge.log` (`events()` reads it). Killed if
  it still runs when the block ends: a test that wants a clean stop sends SIGTERM itself and
  checks the exit status.
- `notify_socket()`: systemd's notify socket, stood in for.
"""

from __future__ import annotations

import os
import resource
import socket
import subprocess
import sys
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from functools import partial
from pathlib import Path
from typing import Any

import orjson

from tests.support.servers import free_port

EDGE = str(Path(sys.executable).parent / "backhaul-edge")


@contextmanager
def notify_socket(tmp_path: Path, timeout_s: float = 20.0) -> Iterator[socket.socket]:
    """A datagram socket at `tmp_path/notify.sock` to pass as `edge_process(notify=...)`: each
    `recv()` is one message the program sent systemd (`READY=1`), waited for `timeout_s` at
    most."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    try:
        sock.bind(str(tmp_path / "notify.sock"))
        sock.settimeout(timeout_s)
        yield sock
    finally:
        sock.close()


@contextmanager
def edge_process(
    tmp_path: Path,
    *,
    notify: socket.socket | None = None,
    nofile: tuple[int, int] | None = None,
    env: Mapping[str, str] | None = None,
    **settings: str,
) -> Iterator[tuple[subprocess.Popen[bytes], int]]:
    """`backhaul-edge serve` on a free port, open (`auth=none`) unless `settings` say otherwise;
    yields the process and its HTTP port as soon as it is started (not yet listening).

    `settings` are further BACKHAUL_EDGE_* variables, named without the prefix
    (`keys_reload_interval="0.1"`); `notify` is where it says READY=1; `nofile` the soft and
    hard descriptor limits it starts with (a unit's `LimitNOFILE`); `env`, other variables
    (`WATCHDOG_USEC`).
    """
    port = free_port()
    values = {
        **os.environ,
        "BACKHAUL_EDGE_PORT": str(port),
        "BACKHAUL_EDGE_AUTH": "none",
        "BACKHAUL_EDGE_UPSTREAM": f"http://127.0.0.1:{free_port()}",
        "BACKHAUL_EDGE_TELEMETRY_PATH": str(tmp_path / "t.jsonl"),
        "BACKHAUL_EDGE_KEYS_PATH": str(tmp_path / "keys.json"),
        "BACKHAUL_EDGE_BANS_PATH": str(tmp_path / "bans.json"),
        "BACKHAUL_EDGE_LOG_FORMAT": "json",
        **{f"BACKHAUL_EDGE_{name.upper()}": value for name, value in settings.items()},
        **(env or {}),
    }
    if notify is not None:
        values["NOTIFY_SOCKET"] = notify.getsockname()
    # Set in the child before it runs the program, as systemd does.
    limits = None if nofile is None else partial(resource.setrlimit, resource.RLIMIT_NOFILE, nofile)
    with (tmp_path / "edge.log").open("wb") as log:
        proc = subprocess.Popen(
            [EDGE, "serve"],
            env=values,
            cwd=tmp_path,
            stdout=subprocess.DEVNULL,
            stderr=log,
            preexec_fn=limits,
        )
    try:
        yield proc, port
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def events(tmp_path: Path) -> list[dict[str, Any]]:
    """The events in `edge_process()`'s log so far, in order."""
    lines = (tmp_path / "edge.log").read_bytes().splitlines()
    return [orjson.loads(line) for line in lines if line.startswith(b"{")]
