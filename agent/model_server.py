"""The local model server behind the tunnel: is it answering, and are its models loaded?

`ModelServer.run()` probes `GET /api/version` (Ollama) or, if that is not found, `GET /v1/models`
(llama.cpp, vLLM and other OpenAI-compatible servers) every `probe_interval`, logs each change
(`model_server.up`, `model_server.down` with the reason) and records it in the status board.
When the server comes up (at start, and every time it comes back) the models in `warm_models`
are loaded with `POST /api/generate {"model", "keep_alive"}` and no prompt, which Ollama answers
by loading the model and returning at once; they are warmed again every `warm_interval` because
any request without `keep_alive` (the edge strips it) resets Ollama's unload timer to its 5
minute default.

The events are `model_server.*`, not `upstream.*`: on the edge, `upstream.*` is the tunnel's
loopback end, and `make demo` interleaves both logs. The setting (`upstream`, the URL), the
status file's `upstream_*` fields and the `backhaul_agent_upstream_up` metric keep their names:
configurations, scripts and dashboards read them.

The tunnel is not withdrawn while the model server is down: the edge then gets a reset on each
forwarded connection (the agent's connect to the model server fails, the channel is refused) and
answers 502 at once, which says more than "no agent" would.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable

import aiohttp
import orjson
import structlog

from agent.settings import AgentSettings
from agent.status import StatusBoard
from shared.secrets import read_key_file

log = structlog.get_logger(__name__)

Sleep = Callable[[float], Awaitable[None]]

# Seconds a warm-up may take: loading a large model from disk into VRAM can take minutes.
_WARM_TIMEOUT_S = 600.0
API_KEY_SETTING = "BACKHAUL_AGENT_UPSTREAM_API_KEY_FILE"


class ModelServer:
    """Probes and warms the local model server; `wait_up()`/`wait_down()` for whoever waits."""

    def __init__(
        self,
        settings: AgentSettings,
        board: StatusBoard | None = None,
        *,
        sleep: Sleep = asyncio.sleep,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        """Error handling: raises `ConfigError` when `upstream_api_key_file` is set and cannot
        be used."""
        self._settings = settings
        key = read_key_file(settings.upstream_api_key_file, API_KEY_SETTING)
        # The model server's own key, if it has one: on every probe and warm-up.
        self._headers = {} if key is None else {"Authorization": f"Bearer {key.get_secret_value()}"}
        self._board = board or StatusBoard(None)
        self._sleep = sleep
        self._clock = clock
        self._url = settings.upstream
        self._probe_timeout = aiohttp.ClientTimeout(total=settings.probe_timeout)
        self.up: bool | None = None
        self.kind: str | None = None  # "ollama" or "openai"
        self.version: str | None = None
        self.reason: str | None = None
        self._up = asyncio.Event()
        self._down = asyncio.Event()
        self._warm_due = 0.0
        self._warming: asyncio.Task[None] | None = None
        self.warmed: set[str] = set()
        self.warm_runs = 0  # completed warm-up rounds (tests wait on the event below)
        self._warmed_event = asyncio.Event()

    async def wait_up(self) -> None:
        await self._up.wait()

    async def wait_down(self) -> None:
        await self._down.wait()

    async def wait_warmed(self, runs: int = 1) -> None:
        """Return once `runs` warm-up rounds have completed since start."""
        while self.warm_runs < runs:
            self._warmed_event.clear()
            await self._warmed_event.wait()

    async def run(self) -> None:
        """Probe forever, warming on each return; cancel to stop.

        Resource handling: owns one `ClientSession` and, inside a task group, at most one
        warm-up task at a time.
        """
        async with (
            aiohttp.ClientSession(
                skip_auto_headers=("User-Agent",), headers=self._headers
            ) as session,
            asyncio.TaskGroup() as tg,
        ):
            while True:
                came_up = await self.probe(session)
                idle = self._warming is None or self._warming.done()
                if self.up and self._settings.warm_models and idle:
                    interval = self._settings.warm_interval
                    if came_up or (interval > 0 and self._clock() >= self._warm_due):
                        self._warming = tg.create_task(self._warm_all(session))
                await self._sleep(self._settings.probe_interval)

    async def probe(self, session: aiohttp.ClientSession) -> bool:
        """Probe once and record the result; True if the server just came (back) up."""
        try:
            kind, version = await self._identify(session)
        except (aiohttp.ClientError, TimeoutError, ValueError) as exc:
            self._set_down(_reason(exc))
            return False
        if kind is None:
            self._set_down(version or "no /api/version or /v1/models")
            return False
        return self._set_up(kind, version)

    async def _identify(self, session: aiohttp.ClientSession) -> tuple[str | None, str | None]:
        async with session.get(f"{self._url}/api/version", timeout=self._probe_timeout) as r:
            body = await r.read()
            if r.status == 200:
                return "ollama", str(orjson.loads(body).get("version", ""))
            if r.status != 404:
                return None, f"/api/version answered {r.status}"
        async with session.get(f"{self._url}/v1/models", timeout=self._probe_timeout) as r:
            await r.read()
            if r.status == 200:
                return "openai", None
            return None, f"/api/version 404, /v1/models answered {r.status}"

    def _set_up(self, kind: str, version: str | None) -> bool:
        came_up = self.up is not True
        self.up, self.kind, self.version, self.reason = True, kind, version, None
        if came_up:
            log.info("model_server.up", url=self._url, kind=kind, version=version)
            self._down.clear()
            self._up.set()
            self._board.model_server_up(kind, version)
        return came_up

    def _set_down(self, reason: str) -> None:
        if self.up is not False or reason != self.reason:
            log.warning("model_server.down", url=self._url, reason=reason)
            self._board.model_server_down(reason)
        self.up, self.reason = False, reason
        self.warmed.clear()
        self._up.clear()
        self._down.set()

    async def _warm_all(self, session: aiohttp.ClientSession) -> None:
        if self.kind != "ollama":
            log.info("model_server.warm_skipped", reason=f"{self.kind} servers have no load call")
            return
        for model in self._settings.warm_models:
            await self._warm(session, model)
        self._warm_due = self._clock() + self._settings.warm_interval
        self.warm_runs += 1
        self._board.models_warmed(self.warmed)
        self._warmed_event.set()

    async def _warm(self, session: aiohttp.ClientSession, model: str) -> None:
        started = self._clock()
        body = {"model": model, "keep_alive": self._settings.warm_keep_alive}
        try:
            async with session.post(
                f"{self._url}/api/generate",
                json=body,
                timeout=aiohttp.ClientTimeout(total=_WARM_TIMEOUT_S),
            ) as r:
                text = await r.read()
                if r.status != 200:
                    log.warning(
                        "model_server.warm_failed", model=model, status=r.status, body=text[:200]
                    )
                    self.warmed.discard(model)
                    return
        except (aiohttp.ClientError, TimeoutError) as exc:
            log.warning("model_server.warm_failed", model=model, error=_reason(exc))
            self.warmed.discard(model)
            return
        self.warmed.add(model)
        log.info("model_server.warmed", model=model, seconds=round(self._clock() - started, 3))


def _reason(exc: BaseException) -> str:
    if isinstance(exc, TimeoutError):
        return "no answer in time"
    if isinstance(exc, aiohttp.ClientConnectorError):
        return f"connect failed: {exc.os_error.strerror or exc.os_error}"
    return f"{type(exc).__name__}: {exc}"
