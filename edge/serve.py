"""`backhaul-edge serve`: run the edge until SIGTERM or SIGINT; SIGHUP reopens the JSONL file
and looks at the API keys file at once."""

from __future__ import annotations

import argparse
import asyncio
import sys
from functools import partial
from pathlib import Path
from typing import Any

import structlog

from edge.app import create_app
from edge.http.protocol import EdgeRunner
from edge.policy.admission import raise_fd_limit
from edge.policy.listeners import GuardedSite
from edge.services import Edge, open_edge
from edge.settings import EdgeSettings
from shared import runtime
from shared.errors import ConfigError
from shared.logging import configure_logging
from shared.notify import Notifier, SystemdEnv

log = structlog.get_logger(__name__)


def register(sub: Any) -> None:
    parser: argparse.ArgumentParser = sub.add_parser(
        "serve", help="run the edge", description=__doc__
    )
    parser.add_argument("--config", type=Path, help="TOML file (default /etc/backhaul/edge.toml)")
    parser.add_argument("--host", help="listen address (127.0.0.1)")
    parser.add_argument("--port", type=int, help="listen port (8080)")
    parser.add_argument("--upstream", help="the tunnel's loopback end (http://127.0.0.1:11434)")
    parser.add_argument("--telemetry-path", type=Path, help="the JSONL file")
    parser.add_argument("--ssh-port", type=int, help="embedded SSH server port; 0 = off")
    parser.add_argument("--log-level", help="debug, info, warning, error")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    try:
        settings = EdgeSettings.load_args(
            args, "host", "port", "upstream", "telemetry_path", "ssh_port", "log_level"
        )
    except ConfigError as exc:
        print(f"backhaul-edge: {exc}", file=sys.stderr)
        return 2
    configure_logging(settings.log_level, settings.log_format)  # type: ignore[arg-type]
    try:
        runtime.run(serve(settings))
    except ConfigError as exc:  # a file found wrong at start (keys, telemetry): say which, stop
        log.error("edge.refused_to_start", error=str(exc))
        return 2
    except Exception as exc:  # a background loop failed (logged with its traceback): restart
        log.error("edge.stopped_on_error", error=f"{type(exc).__name__}: {exc}")
        return 1
    return 0


def _on_sighup(edge: Edge) -> None:
    edge.telemetry.reopen()
    if edge.guard.keys is not None:
        edge.guard.keys.request_reload()


async def serve(settings: EdgeSettings, started: asyncio.Event | None = None) -> None:
    """Serve until SIGTERM/SIGINT, then stop accepting, finish, and clean up.

    `started` is set once the listener is up (the demo and tests wait on it). The edge's
    background loops run for as long (`open_edge`); one that fails stops the edge with its
    exception, which `run()` makes a non-zero exit.
    """
    # Before the edge: its HTTP connection cap is derived from the limit (edge.policy.admission).
    nofile = raise_fd_limit()
    async with open_edge(settings) as edge:
        await _serve(edge, nofile, started)


async def _serve(edge: Edge, nofile: int, started: asyncio.Event | None) -> None:
    settings = edge.settings
    runner = EdgeRunner(create_app(edge), handler_cancellation=True, access_log=None)
    notifier = Notifier.from_env(SystemdEnv())
    await runner.setup()
    runtime.tune_gc()
    try:
        http = edge.listeners.http
        site = GuardedSite(runner, settings.host, settings.port, http)
        await site.start()
        with runtime.stop_on_signals(on_sighup=partial(_on_sighup, edge)) as stop:
            log.info(
                "edge.listening",
                address=site.name,
                upstream=settings.upstream,
                fd_limit=nofile,
                max_connections=http.total,
                max_connections_per_address=http.per_address,
            )
            # systemd (Type=notify): ready once the listener is up; the watchdog is fed from
            # this loop, so a wedged loop gets the edge restarted, not only a dead process.
            notifier.ready(f"serving on {site.name}")
            if started is not None:
                started.set()
            async with asyncio.TaskGroup() as group:
                watchdog = group.create_task(notifier.run_watchdog(), name="watchdog")
                await stop.wait()
                watchdog.cancel()
        log.info("edge.stopping")
        notifier.stopping()
    finally:
        await runner.cleanup()
        notifier.close()
