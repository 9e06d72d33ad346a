"""An attacker on loopback for the connection-limit tests and bench/flood_bench.py: connections
from another source address (the whole of 127/8 is loopback on Linux), held open or checked for
a refusal.

A refused connection is closed by the edge at accept, before it writes a byte: the client reads
end-of-file (or a reset). An admitted one stays open; the SSH port greets it with its version.

`Flood` is the attacker that matters for "no anonymous take-down": a process of its own
(`python -m tests.support.flood PORT COUNT`) that tries to hold `COUNT` idle connections to one
port and reopens every connection the server closes or refuses, at once (or at most `--rate` a
second), as a real attacker does. One that opened its connections once and let them go would measure
nothing: an edge without caps outlives it, since its login and keep-alive timeouts close what
the flood holds and the agent gets the freed descriptors. A process, not a task, so that its
CPU is not the measuring client's; a selector loop over plain sockets, so that it is as fast as
Python gets without a task per connection.
"""

from __future__ import annotations

import argparse
import asyncio
import errno
import json
import os
import resource
import selectors
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from dataclasses import asdict, dataclass
from pathlib import Path
from types import FrameType
from typing import cast

ATTACKER = "127.0.0.2"
ROOT = Path(__file__).resolve().parents[2]
# Seconds a flood process lives at most, even if its parent hangs; it stops when the parent exits.
FLOOD_DEADLINE_S = 120.0


def raise_own_fd_limit() -> int:
    """Lift this process's soft descriptor limit to its hard one; return the new soft limit."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


async def connect(
    port: int, source: str = ATTACKER
) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    return await asyncio.open_connection("127.0.0.1", port, local_addr=(source, 0))


async def was_refused(reader: asyncio.StreamReader) -> bool:
    """True when the server closed the connection without a byte; False when it sent one.
    Unbounded: callers add a timeout (an admitted, silent HTTP connection sends nothing)."""
    try:
        return await reader.read(1) == b""
    except ConnectionResetError:
        return True


async def refused(port: int, source: str = ATTACKER) -> bool:
    """Whether a new connection from `source` is closed at once (within 5 s)."""
    reader, writer = await connect(port, source)
    try:
        async with asyncio.timeout(5):
            return await was_refused(reader)
    finally:
        writer.close()


async def http_status(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> int:
    """One `GET /healthz` on an open connection; its status (0: closed without an answer)."""
    writer.write(b"GET /healthz HTTP/1.1\r\nHost: edge\r\n\r\n")
    async with asyncio.timeout(5):
        line = await reader.readline()
    return int(line.split()[1]) if line else 0


def close_all(writers: list[asyncio.StreamWriter]) -> None:
    for writer in writers:
        writer.close()


@dataclass
class FloodStats:
    """What one flood did, counted on the attacker's side."""

    attempts: int = 0  # connections started
    closed: int = 0  # established, then closed or reset by the server (refusals included)
    failed: int = 0  # never established: reset, refused or timed out in the handshake
    local_errors: int = 0  # this process could not start one (no port, no descriptor)
    greeted: int = 0  # connections on which the server sent a byte (SSH's version line)
    seconds: float = 0.0


class _Attacker:
    """The selector loop behind `Flood`: keep `count` connections to `port` open or opening."""

    def __init__(self, port: int, count: int, source: str, rate: float) -> None:
        self.target = ("127.0.0.1", port)
        self.count, self.source, self.rate = count, source, rate
        self.stats = FloodStats()
        self.selector = selectors.DefaultSelector()
        self.connecting: set[socket.socket] = set()
        self.open: set[socket.socket] = set()
        self.spoken: set[socket.socket] = set()
        self.stop = False

    def run(self, deadline_s: float, on_full: Callable[[], None]) -> FloodStats:
        """Until `stop` or `deadline_s`; `on_full` is called once every first connection has
        started."""
        start = time.monotonic()
        announced = False
        allowance, last = float(self.count), start  # the first `count` go at once
        parent = os.getppid()
        while not self.stop and time.monotonic() - start < deadline_s:
            if os.getppid() != parent:
                break  # the test or benchmark that started it is gone
            now = time.monotonic()
            if self.rate:
                allowance = min(float(self.count), allowance + (now - last) * self.rate)
                last = now
            missing = self.count - len(self.connecting) - len(self.open)
            while missing > 0 and (not self.rate or allowance >= 1.0):
                missing -= 1
                allowance -= 1.0
                if not self._open_one():
                    break  # out of ports or descriptors: try again after a select
            if not announced and self.stats.attempts >= self.count:
                announced = True
                on_full()
            self._step(0.01 if missing > 0 else 0.2)
        self.stats.seconds = time.monotonic() - start
        for sock in [*self.connecting, *self.open]:
            sock.close()
        return self.stats

    def _open_one(self) -> bool:
        try:
            sock = socket.socket()
        except OSError:
            self.stats.local_errors += 1
            return False
        sock.setblocking(False)
        try:
            sock.bind((self.source, 0))
            code = sock.connect_ex(self.target)
        except OSError:
            code = errno.EADDRNOTAVAIL
        if code not in (0, errno.EINPROGRESS):
            sock.close()
            self.stats.local_errors += 1
            return False
        self.stats.attempts += 1
        self.connecting.add(sock)
        self.selector.register(sock, selectors.EVENT_WRITE)
        return True

    def _step(self, timeout: float) -> None:
        for key, _mask in self.selector.select(timeout):
            sock = cast(socket.socket, key.fileobj)
            if sock in self.connecting:
                self.connecting.discard(sock)
                if sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR):
                    self.stats.failed += 1
                    self._drop(sock)
                else:
                    self.open.add(sock)
                    self.selector.modify(sock, selectors.EVENT_READ)
                continue
            try:
                data = sock.recv(4096)
            except BlockingIOError:
                continue
            except OSError:
                data = b""
            if data:
                if sock not in self.spoken:
                    self.spoken.add(sock)
                    self.stats.greeted += 1
                continue
            self.open.discard(sock)
            self.spoken.discard(sock)
            self.stats.closed += 1
            self._drop(sock)

    def _drop(self, sock: socket.socket) -> None:
        self.selector.unregister(sock)
        sock.close()


def main() -> None:
    parser = argparse.ArgumentParser(description="Hold COUNT connections to 127.0.0.1:PORT.")
    parser.add_argument("port", type=int)
    parser.add_argument("count", type=int)
    parser.add_argument("--source", default=ATTACKER)
    parser.add_argument("--rate", type=float, default=0.0, help="reopens a second (0: no cap)")
    parser.add_argument("--seconds", type=float, default=FLOOD_DEADLINE_S)
    args = parser.parse_args()
    raise_own_fd_limit()
    attacker = _Attacker(args.port, args.count, args.source, args.rate)

    def stop(_signum: int, _frame: FrameType | None) -> None:
        attacker.stop = True

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)

    def on_full() -> None:
        print("full", flush=True)  # the parent's cue to go on

    stats = attacker.run(args.seconds, on_full)
    with suppress(BrokenPipeError):  # an orphan's parent is gone: no one to tell
        print(json.dumps(asdict(stats)), flush=True)


class Flood:
    """A running `python -m tests.support.flood`: `stop()` ends it and returns its `FloodStats`."""

    def __init__(self, proc: subprocess.Popen[str]) -> None:
        self.proc = proc
        self.pid = proc.pid
        self.stats: FloodStats | None = None

    def stop(self) -> FloodStats:
        if self.stats is None:
            self.proc.send_signal(signal.SIGTERM)
            out, _ = self.proc.communicate(timeout=10)
            self.stats = FloodStats(**json.loads(out.strip().splitlines()[-1]))
        return self.stats


@contextmanager
def flooding(port: int, count: int, source: str = ATTACKER, rate: float = 0.0) -> Iterator[Flood]:
    """A `Flood` of `count` connections to `port` from `source` for the length of the block,
    yielded once it has started every one of them."""
    args = [sys.executable, "-m", "tests.support.flood", str(port), str(count), "--source", source]
    proc = subprocess.Popen(
        [*args, "--rate", str(rate)],
        cwd=ROOT,  # where `tests` is importable
        stdout=subprocess.PIPE,
        text=True,
    )
    flood = Flood(proc)
    try:
        assert proc.stdout is not None
        if proc.stdout.readline().strip() != "full":
            raise RuntimeError(f"the flood on port {port} stopped before it started")
        yield flood
    finally:
        try:
            flood.stop()
        except Exception:
            with suppress(OSError):
                proc.kill()
            proc.wait()
            raise


if __name__ == "__main__":
    main()
