"""Process-wide runtime choices every long-running command makes the same way: the event loop,
the GC, and how it stops.

uvloop when it is installed (measured faster: docs/performance.md; absent on Windows), a
garbage collector kept off the tail latency of a long-running server (`tune_gc`), and SIGTERM
or SIGINT as the request to stop, SIGHUP as the program's own "look again" (`stop_on_signals`).

The agent also runs on Windows, where there is no SIGHUP and the Proactor loop has no
`add_signal_handler`: there the stop signals (SIGINT, which a service wrapper's Ctrl+C and a
console's Ctrl-C raise, and SIGBREAK) are caught with `signal.signal` and handed to the loop,
and "look again" has no signal (a restart of the service does it).
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
    """Inside the block, SIGTERM and SIGINT (and SIGBREAK, on Windows) set the event it yields
    (`stop`, or a new one) and SIGHUP, where it exists, calls `on_sighup`, if given; call it
    with the loop running.

    `with stop_on_signals() as stop: ... await stop.wait()`: systemd's stop (SIGTERM), Ctrl-C
    and the caller's own `stop.set()` all end the wait the same way, and the program shuts down
    in its own order instead of being interrupted wherever it was.

    Resource handling: the handlers are removed when the block ends, however it ends, so a
    signal after it gets what it got before (SIGINT: KeyboardInterrupt; SIGTERM: exit).
    """
    stop = asyncio.Event() if stop is None else stop
    loop = asyncio.get_running_loop()
    wanted: list[tuple[signal.Signals, Callable[[], object]]] = [
        (sig, stop.set) for sig in _stop_signals()
    ]
    sighup = getattr(signal, "SIGHUP", None)
    if on_sighup is not None and sighup is not None:
        wanted.append((sighup, on_sighup))
    undo = [_handle(loop, sig, callback) for sig, callback in wanted]
    try:
        yield stop
    finally:
        for restore in reversed(undo):
            restore()


def _stop_signals() -> list[signal.Signals]:
    # SIGBREAK: Ctrl-Break in a Windows console, the only other stop a console process gets.
    names = ("SIGTERM", "SIGINT", "SIGBREAK")
    return [getattr(signal, name) for name in names if hasattr(signal, name)]


def _handle(
    loop: asyncio.AbstractEventLoop, sig: signal.Signals, callback: Callable[[], object]
) -> Callable[[], None]:
    """Run `callback` on `loop` when `sig` arrives; returns what puts the old handling back."""
    try:
        loop.add_signal_handler(sig, callback)
    except NotImplementedError:  # Windows' loops: a plain handler, handed to the loop
        previous = signal.getsignal(sig)
        signal.signal(sig, lambda _sig, _frame: loop.call_soon_threadsafe(callback))

        def restore() -> None:
            # None: a handler not set from Python, which cannot be set back; the default it is.
            signal.signal(sig, signal.SIG_DFL if previous is None else previous)

        return restore
    return lambda: _remove(loop, sig)


def _remove(loop: asyncio.AbstractEventLoop, sig: signal.Signals) -> None:
    loop.remove_signal_handler(sig)


def still_cancelled() -> None:
    """Re-raise a cancellation that Python 3.11's `asyncio.timeout` turned into a TimeoutError
    (a cancel that lands as the timeout expires). Call it where a `TimeoutError` is read as the
    other side's silence in a loop: else the loop takes its own shutdown for a timeout and goes
    on, and whoever waits for it to end waits forever."""
    task = asyncio.current_task()
    if task is not None and task.cancelling():
        raise asyncio.CancelledError
