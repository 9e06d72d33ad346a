"""Start the programs under test as real processes on 127.0.0.1, and stop them afterwards."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path

BIN = Path(sys.executable).parent
# Base URL -> pid of the server `simulator` or `edge` started there (for bench/cpu.py).
PIDS: dict[str, int] = {}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def wait_port(port: int, proc: subprocess.Popen[str], deadline_s: float = 20.0) -> None:
    """Until something accepts on `port`; raises if `proc` exits first or the deadline passes."""
    end = time.monotonic() + deadline_s
    while time.monotonic() < end:
        if proc.poll() is not None:
            detail = proc.stderr.read()[-2000:] if proc.stderr else "see its log"
            raise RuntimeError(f"{proc.args!r} exited {proc.returncode}: {detail}")
        with socket.socket() as sock:
            if sock.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.05)
    raise RuntimeError(f"nothing listens on 127.0.0.1:{port} after {deadline_s} s")


@contextmanager
def process(
    args: list[str], port: int, env: dict[str, str] | None = None, log: Path | None = None
) -> Iterator[int]:
    """Run `args` until the block ends; yields its pid once `port` accepts connections.

    Its stderr goes to `log` when given; otherwise it is kept, and shown if the program
    fails to start or exits with anything but 0 or SIGTERM's -15.
    """
    full_env = {**os.environ, **(env or {})}
    with ExitStack() as files:
        err = files.enter_context(log.open("ab")) if log is not None else subprocess.PIPE
        proc = subprocess.Popen(
            args, env=full_env, stdout=subprocess.DEVNULL, stderr=err, text=True
        )
    try:
        wait_port(port, proc)
        yield proc.pid
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        if proc.stderr is not None:
            if proc.returncode not in (0, -15):
                print(f"{args[0]} exited {proc.returncode}: {proc.stderr.read()[-2000:]}")
            proc.stderr.close()


@contextmanager
def simulator(
    tok_per_s: float = 0, parallel: int = 64, ttft: float | None = None, reply_tokens: int = 256
) -> Iterator[str]:
    """`backhaul-agent simulate` (its own default time to first token unless `ttft`).

    Its reply is `reply_tokens` long, and a request's num_predict cuts it shorter: no longer than
    a benchmark asks for, since the simulator builds the whole reply for every request (100,000
    tokens cost it ~12 ms of CPU a request, 50 times a 64-token answer's relay through the edge).
    """
    port = free_port()
    args = [
        str(BIN / "backhaul-agent"), "simulate", "--port", str(port),
        "--tok-per-s", str(tok_per_s), "--parallel", str(parallel), "--max-queue", "4096",
        "--reply-tokens", str(reply_tokens),
    ]  # fmt: skip
    if ttft is not None:
        args += ["--ttft", str(ttft)]
    with process(args, port) as pid:
        PIDS[url := f"http://127.0.0.1:{port}"] = pid
        yield url


@contextmanager
def edge(
    upstream: str, telemetry: Path, env: dict[str, str] | None = None, /, **settings: str
) -> Iterator[str]:
    """`backhaul-edge serve` with `settings` as BACKHAUL_EDGE_* and `env` (PYTHONPATH, say).

    Its other files (keys.json, bans.json, a host key) are in a directory of its own beside
    `telemetry`, unless `settings` name them: never in the working directory, the checkout.
    """
    port = free_port()
    state = telemetry.with_name(f"{telemetry.stem}-state")
    state.mkdir(exist_ok=True)
    env = {
        "BACKHAUL_EDGE_PORT": str(port),
        "BACKHAUL_EDGE_UPSTREAM": upstream,
        "BACKHAUL_EDGE_STATE_DIR": str(state),
        "BACKHAUL_EDGE_TELEMETRY_PATH": str(telemetry),
        "BACKHAUL_EDGE_LOG_FORMAT": "json",
        # Open unless a benchmark passes auth="keys" (bench/auth_bench.py measures what it costs).
        "BACKHAUL_EDGE_AUTH": "none",
        **{f"BACKHAUL_EDGE_{k.upper()}": v for k, v in settings.items()},
        **(env or {}),
    }
    with process([str(BIN / "backhaul-edge"), "serve"], port, env) as pid:
        PIDS[url := f"http://127.0.0.1:{port}"] = pid
        yield url
