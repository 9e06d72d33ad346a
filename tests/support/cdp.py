"""A real headless Chromium for the browser tests, driven over the DevTools protocol by aiohttp.

Why not Playwright: its Python package drives the browser builds it downloads, which cannot be
downloaded here, and pairs each release with a browser version; Debian's `chromium` moves on its
own. The DevTools protocol is what Playwright speaks to Chromium underneath, and these tests need
three things from it: open a page, navigate, evaluate a script that waits in the page. Commands
are sent one at a time and their answer is read off the same websocket (events in between are
kept for the failure message), so there is no reader task to own.

Resource handling: `chromium()` owns the process, the task draining its stderr and the
websocket; on exit the websocket is closed, the process killed and reaped and the drain ended,
whatever happened.
"""

from __future__ import annotations

import asyncio
import os
import shutil
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from itertools import count
from pathlib import Path
from typing import Any

import aiohttp
import orjson

# Flags that work on this machine and in CI: no sandbox (root in a container), no GPU, no
# background traffic to Google that could slow or flake a test, a fresh profile each time.
FLAGS = (
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--remote-debugging-port=0",
)
_DEVTOOLS_LINE = b"DevTools listening on "
# Seconds for Chromium to start and print its DevTools address (about 1 s here).
_START_TIMEOUT_S = 20.0


def find_chromium() -> str | None:
    """Debian's `chromium` (or another Chromium on PATH), else None."""
    for name in ("chromium", "chromium-browser", "google-chrome"):
        path = shutil.which(name)
        if path:
            return path
    return "/usr/bin/chromium" if os.access("/usr/bin/chromium", os.X_OK) else None


class EvaluationError(AssertionError):
    """A script in the page threw, or the protocol refused a command."""


class Page:
    """One browser tab, attached in flat mode: its commands carry the tab's session id."""

    def __init__(self, browser: Browser, session_id: str) -> None:
        self._browser = browser
        self._session_id = session_id

    async def send(self, method: str, **params: Any) -> dict[str, Any]:
        return await self._browser.send(method, session_id=self._session_id, **params)

    async def goto(self, url: str) -> None:
        """Navigate and wait for the page's load event."""
        result = await self.send("Page.navigate", url=url)
        if result.get("errorText"):
            raise EvaluationError(f"navigating to {url}: {result['errorText']}")
        await self.evaluate(
            "new Promise(resolve => document.readyState === 'complete'"
            " ? resolve() : addEventListener('load', () => resolve()))"
        )

    async def evaluate(self, expression: str) -> Any:
        """The value of `expression` (awaited when it is a promise), as JSON."""
        result = await self.send(
            "Runtime.evaluate", expression=expression, awaitPromise=True, returnByValue=True
        )
        if "exceptionDetails" in result:
            details = result["exceptionDetails"]
            text = details.get("exception", {}).get("description") or details.get("text")
            raise EvaluationError(f"the page threw: {text}\n{self._browser.events_text()}")
        return result["result"].get("value")


class Browser:
    """The browser-wide DevTools connection."""

    def __init__(self, ws: aiohttp.ClientWebSocketResponse) -> None:
        self._ws = ws
        self._ids = count(1)
        self.events: list[dict[str, Any]] = []

    async def send(
        self, method: str, session_id: str | None = None, **params: Any
    ) -> dict[str, Any]:
        """Send one command and return its result; events that arrive meanwhile are kept."""
        message: dict[str, Any] = {"id": next(self._ids), "method": method, "params": params}
        if session_id is not None:
            message["sessionId"] = session_id
        await self._ws.send_str(orjson.dumps(message).decode())  # DevTools takes text frames only
        while True:
            reply = await self._ws.receive()
            if reply.type not in (aiohttp.WSMsgType.TEXT, aiohttp.WSMsgType.BINARY):
                raise EvaluationError(f"DevTools connection ended during {method}: {reply}")
            data = orjson.loads(reply.data)
            if data.get("id") == message["id"]:
                if "error" in data:
                    raise EvaluationError(f"{method}: {data['error']}")
                result: dict[str, Any] = data["result"]  # every CDP result is an object
                return result
            self.events.append(data)

    async def new_page(self) -> Page:
        target = await self.send("Target.createTarget", url="about:blank")
        attached = await self.send(
            "Target.attachToTarget", targetId=target["targetId"], flatten=True
        )
        page = Page(self, attached["sessionId"])
        await page.send("Runtime.enable")  # console messages and exceptions, for failures
        await page.send("Page.enable")
        return page

    def events_text(self) -> str:
        """The page's console output and uncaught exceptions so far, for an assertion message."""
        lines = []
        for event in self.events:
            params = event.get("params", {})
            if event.get("method") == "Runtime.consoleAPICalled":
                args = " ".join(str(a.get("value", a.get("description"))) for a in params["args"])
                lines.append(f"console.{params['type']}: {args}")
            elif event.get("method") == "Runtime.exceptionThrown":
                lines.append(f"exception: {params['exceptionDetails'].get('text')}")
        return "\n".join(lines) or "(no console output)"


@asynccontextmanager
async def chromium(executable: str, profile: Path) -> AsyncIterator[Browser]:
    """Start a headless Chromium with a fresh profile in `profile`; yield its DevTools."""
    proc = await asyncio.create_subprocess_exec(
        executable,
        *FLAGS,
        f"--user-data-dir={profile}",
        "about:blank",
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.PIPE,
    )
    assert proc.stderr is not None
    stderr: list[bytes] = []
    drain: asyncio.Task[None] | None = None
    try:
        try:
            async with asyncio.timeout(_START_TIMEOUT_S):
                url = await _devtools_url(proc.stderr, stderr)
        except TimeoutError:
            raise AssertionError(f"chromium did not start: {b''.join(stderr)!r}") from None
        # Keep reading stderr, or Chromium blocks once the pipe fills. Owned here: cancelled
        # and awaited below (a TaskGroup would wrap the test's own failure in a group).
        drain = asyncio.create_task(_drain(proc.stderr, stderr))
        async with (
            aiohttp.ClientSession() as session,
            session.ws_connect(url, max_msg_size=0) as ws,
        ):
            yield Browser(ws)
    finally:
        if proc.returncode is None:
            proc.kill()
        await proc.wait()
        if drain is not None:
            drain.cancel()
            await asyncio.gather(drain, return_exceptions=True)


async def _devtools_url(stream: asyncio.StreamReader, seen: list[bytes]) -> str:
    while line := await stream.readline():
        seen.append(line)
        if line.startswith(_DEVTOOLS_LINE):
            return line[len(_DEVTOOLS_LINE) :].strip().decode()
    raise AssertionError(f"chromium exited before it listened: {b''.join(seen)!r}")


async def _drain(stream: asyncio.StreamReader, seen: list[bytes]) -> None:
    while line := await stream.readline():
        seen.append(line)
