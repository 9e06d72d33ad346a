"""Process-wide runtime choices every long-running command makes the same way: the event loop,
the GC, and how it stops.

uvloop when it is installed (measured faster: docs/performance.md; absent on Windows), a
garbage collector kept off the tail latency of a long-running server (`tune_gc`), and SIGTERM
or SIGINT as the request to stop, SIGHUP as the program's own "look again" (`stop_on_signals`).
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import signal
from collections.abc import Callable, Coroutine, Iterator
from typing import Any, TypeVar

T = TypeVar("T")

# Allocations between young-generation collections (CPython's default: 700). A proxied request
# makes a few hundred short-lived objects in reference cycles (aiohttp's request and response).
_GC_GEN0_THRESHOLD = 20_000


def loop_factory() -> Callable[[], asyncio.AbstractEventLoop] | None:
    """uvloop's loop factory, or None (asyncio's default loop) when uvloop is not installed."""
    try:
        import uvloop
    except ImportError:
        return None
    return uvloop.new_event_loop


def run(main: Coroutine[Any, Any, T]) -> T:
    """Run `main` to completion on uvloop when it is installed."""
    with asyncio.Runner(loop_factory=loop_factory()) as runner:
        return runner.run(main)


def tune_gc() -> None:
    """Keep the cyclic garbage collector off a server's tail latency; call once it is set up.

    Measured on the edge (docs/performance.md): with CPython's defaults, full collections walk
    every object of every imported module and of the app, pausing the loop 40-90 ms every few
    seconds at concurrency 32, which was the whole of its p99. Freezing what exists once the
    server is built moves it out of every later collection, and a larger young generation makes
    collections rarer.
    """
    gc.collect()
    gc.freeze()
    gc.set_threshold(_GC_GEN0_THRESHOLD, 50, 100)


@contextlib.contextmanager
def stop_on_signals(
    stop: asyncio.Event | None = None, *, on_sighup: Callable[[], object] | None = None
) -> Iterator[asyncio.Event]:
    """Inside the block, SIGTERM and SIGINT set the event it yields (`stop`, or a new one) and
    SIGHUP calls `on_sighup`, if given; call it with the loop running.

    `with stop_on_signals() as stop: ... await stop.wait()`: systemd's stop (SIGTERM), Ctrl-C
    and the caller's own `stop.set()` all end the wait the same way, and the program shuts down
    in its own order instead of being interrupted wherever it was.

    Resource handling: the handlers are removed when the block ends, however it ends, so a
    signal after it gets Python's default (SIGINT: KeyboardInterrupt; SIGTERM: exit).
    """
    stop = asyncio.Event() if stop is None else stop
    loop = asyncio.get_running_loop()
    handled = [signal.SIGTERM, signal.SIGINT]
    for sig in handled:
        loop.add_signal_handler(sig, stop.set)
    if on_sighup is not None:
        loop.add_signal_handler(signal.SIGHUP, on_sighup)
        handled.append(signal.SIGHUP)
    try:
        yield stop
    finally:
        for sig in handled:
            loop.remove_signal_handler(sig)
