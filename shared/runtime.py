"""Process-wide runtime choices both programs make the same way: the event loop and the GC.

uvloop when it is installed (measured faster: docs/performance.md; absent on Windows), and a
garbage collector kept off the tail latency of a long-running server (`tune_gc`).
"""

from __future__ import annotations

import asyncio
import gc
from collections.abc import Callable, Coroutine
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
