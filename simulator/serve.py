"""The simulator's entry points: serve it in-process for tests, or as `backhaul-agent simulate`.

The demo, the tests and the benchmarks need a model server and this machine has no GPU: they
get a real aiohttp server on loopback that speaks Ollama's API (`simulator.app`), from
`running_simulator()` (or `start_simulator()` when the caller wants to own the runner). The
`simulate` command serves the same app until SIGINT or SIGTERM. The names the rest of backhaul
uses are re-exported here, so `simulator.serve` is the only import a caller needs.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

import structlog
from aiohttp import web
from pydantic import ValidationError

from shared import runtime
from shared.logging import configure_logging
from simulator.app import (
    SIM_STATS,
    SeenRequest,
    SimulatorSettings,
    SimulatorStats,
    create_simulator_app,
)

__all__ = [
    "SIM_STATS",
    "RunningSimulator",
    "SeenRequest",
    "SimulatorSettings",
    "SimulatorStats",
    "create_simulator_app",
    "register",
    "run",
    "running_simulator",
    "settings_from_args",
    "start_simulator",
]

log = structlog.get_logger(__name__)

SHUTDOWN_S = 1.0  # a generation in flight at shutdown is cancelled, not waited for


async def start_simulator(
    settings: SimulatorSettings, host: str = "127.0.0.1", port: int = 0
) -> tuple[web.AppRunner, int]:
    """Serve a new simulator on `host:port` (0: any free port); return the runner and the port.

    Resource handling: the caller owns the runner and must `await runner.cleanup()`;
    `running_simulator` does that for you. Generations in flight then are cancelled.
    """
    app = create_simulator_app(settings)
    runner = web.AppRunner(
        app, handler_cancellation=True, shutdown_timeout=SHUTDOWN_S, access_log=None
    )
    await runner.setup()
    try:
        await web.TCPSite(runner, host, port).start()
    except BaseException:
        await runner.cleanup()
        raise
    bound: int = runner.addresses[0][1]
    return runner, bound


@dataclass(frozen=True, slots=True)
class RunningSimulator:
    """A simulator serving on loopback: its base URL (no trailing slash), port and app."""

    url: str
    port: int
    app: web.Application

    @property
    def stats(self) -> SimulatorStats:
        return self.app[SIM_STATS]


@asynccontextmanager
async def running_simulator(
    settings: SimulatorSettings | None = None, host: str = "127.0.0.1", port: int = 0
) -> AsyncIterator[RunningSimulator]:
    """`async with running_simulator(settings) as sim:` a real server until the block ends."""
    runner, bound = await start_simulator(settings or SimulatorSettings(), host, port)
    try:
        netloc = f"[{host}]" if ":" in host else host
        yield RunningSimulator(f"http://{netloc}:{bound}", bound, runner.app)
    finally:
        await runner.cleanup()


def _default(name: str) -> str:
    value = SimulatorSettings.model_fields[name].default
    return ",".join(value) if isinstance(value, tuple) else str(value)


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add the `simulate` command."""
    p = sub.add_parser(
        "simulate",
        help="serve a simulated Ollama (no GPU, no weights)",
        description="Serve Ollama's HTTP API with paced, deterministic replies and no model "
        "behind it, until SIGINT or SIGTERM. For the demo, the tests and the benchmarks.",
    )
    p.add_argument("--host", default="127.0.0.1", help="listen address (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=11434, help="listen port (default 11434)")
    add = p.add_argument
    add(
        "--tok-per-s",
        type=float,
        help=f"decode speed, 0 = unpaced (default {_default('tok_per_s')})",
    )
    add("--ttft", type=float, help=f"seconds to the first token (default {_default('ttft')})")
    add("--reply-tokens", type=int, help=f"uncut reply length (default {_default('reply_tokens')})")
    add("--models", nargs="+", metavar="NAME", help=f"models served (default {_default('models')})")
    add("--parallel", type=int, help=f"OLLAMA_NUM_PARALLEL (default {_default('parallel')})")
    add("--max-queue", type=int, help=f"OLLAMA_MAX_QUEUE (default {_default('max_queue')})")
    p.set_defaults(func=run)


def settings_from_args(args: argparse.Namespace) -> SimulatorSettings:
    """The settings the `simulate` flags ask for; unset flags keep the defaults."""
    given: dict[str, Any] = {
        name: getattr(args, name)
        for name in ("tok_per_s", "ttft", "reply_tokens", "parallel", "max_queue")
        if getattr(args, name) is not None
    }
    if args.models:
        given["models"] = tuple(n for arg in args.models for n in arg.split(",") if n)
    return SimulatorSettings(**given)


def run(args: argparse.Namespace) -> int:
    """Serve until SIGINT or SIGTERM; 2 for bad flags, 1 if the address cannot be bound."""
    configure_logging()
    try:
        settings = settings_from_args(args)
    except ValidationError as exc:
        print(f"backhaul-agent simulate: {exc}", file=sys.stderr)
        return 2
    try:
        runtime.run(_serve(settings, args.host, args.port))
    except OSError as exc:
        log.error("simulator.bind_failed", host=args.host, port=args.port, error=str(exc))
        return 1
    return 0


async def _serve(settings: SimulatorSettings, host: str, port: int) -> None:
    with runtime.stop_on_signals() as stop:
        runner, bound = await start_simulator(settings, host, port)
        # A stand-in for Ollama (Go): no multi-millisecond GC pauses of its own in the baseline.
        runtime.tune_gc()
        try:
            log.info("simulator.listening", host=host, port=bound, **settings.model_dump())
            await stop.wait()
        finally:
            await runner.cleanup()
    log.info("simulator.stopped")
