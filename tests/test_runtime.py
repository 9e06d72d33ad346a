"""How every long-running command stops and reloads (`shared.runtime.stop_on_signals`): SIGTERM
and SIGINT end the wait so the program shuts down in its own order, SIGHUP calls the program's
own handler, and the handlers are gone once the block ends. In a process of its own: a signal
this test sends must never reach the test runner."""

from __future__ import annotations

import asyncio
import signal
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

PROGRAM = """
import asyncio, signal
from shared import runtime

async def main():
    hups = []
    def on_sighup():
        hups.append(1)
        print("hup", flush=True)
    with runtime.stop_on_signals(on_sighup=on_sighup) as stop:
        print("ready", flush=True)
        await stop.wait()
    default = signal.getsignal(signal.SIGTERM) == signal.SIG_DFL
    print(f"stopped hups={len(hups)} default_after={default}", flush=True)

asyncio.run(main())
"""


@pytest.mark.parametrize("stop_signal", [signal.SIGTERM, signal.SIGINT])
async def test_a_stop_signal_ends_the_wait_and_sighup_does_not(stop_signal: signal.Signals):
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-c", PROGRAM, cwd=ROOT, stdout=asyncio.subprocess.PIPE
    )
    assert proc.stdout is not None
    try:
        async with asyncio.timeout(10):
            assert await proc.stdout.readline() == b"ready\n"
            proc.send_signal(signal.SIGHUP)
            assert await proc.stdout.readline() == b"hup\n"
            proc.send_signal(stop_signal)
            assert await proc.stdout.readline() == b"stopped hups=1 default_after=True\n"
            assert await proc.wait() == 0
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
