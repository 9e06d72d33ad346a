"""Knowing whether the model server behind the tunnel can answer, before a request waits on it.

Three sources feed one state: the embedded SSH server's connect and disconnect events (exact,
when that mode is on), a liveness probe (`GET /api/version` through the tunnel every
`probe_interval`, faster while down; `GET /v1/models` too on a server without Ollama's API), and
what requests themselves see (a refused connect marks the agent absent at once, a 401 a refused
credential). While the state is down, requests are answered 503 (or 502) at once
instead of waiting for a connect or read timeout, and requests already waiting for response
headers are woken with the same answer: a half-open tunnel accepts connections and then stays
silent, so without this they would wait the whole read timeout.

Resource handling: the probe loop is `run()`, which `edge.services.open_edge()` runs in the
edge's task group for its lifetime.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from types import TracebackType

import aiohttp
import structlog

from edge.errors import AgentUnavailable, EdgeError, UpstreamRefused, UpstreamUnavailable
from edge.upstreams.base import State, Status, classify, classify_answer
from shared.runtime import still_cancelled

log = structlog.get_logger(__name__)

_UNREACHABLE = (State.AGENT_ABSENT, State.TUNNEL_SILENT)
# While down, probe this often (s): the agent's return is noticed within it.
_DOWN_PROBE_INTERVAL_S = 0.5


class Waiting:
    """An `asyncio.timeout` the monitor can fire early (then `woken` is True); a class, not a
    generator-based context manager, because it is on every request's path."""

    __slots__ = ("_registry", "_seconds", "_timeout", "woken")

    def __init__(self, registry: set[Waiting], seconds: float) -> None:
        self._registry = registry
        self._seconds = seconds
        self._timeout: asyncio.Timeout | None = None
        self.woken = False

    def wake(self, now: float) -> None:
        """End the wait now: the connection it waits on is gone."""
        if self._timeout is not None:
            self.woken = True
            self._timeout.reschedule(now)

    async def __aenter__(self) -> asyncio.Timeout:
        self._timeout = asyncio.timeout(self._seconds)
        await self._timeout.__aenter__()
        self._registry.add(self)
        return self._timeout

    async def __aexit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        assert self._timeout is not None
        self._registry.discard(self)
        await self._timeout.__aexit__(kind, exc, tb)


class UpstreamMonitor:
    """The upstream's state, its liveness probe, and the requests waiting on it."""

    def __init__(
        self,
        base_url: str,
        probe_interval: float,
        probe_timeout: float,
        retry_after: int,
        name: str = "",
    ) -> None:
        self._log = log.bind(agent=name) if name else log
        self.rebase(base_url)
        self._probe_interval = probe_interval
        self.probe_timeout = aiohttp.ClientTimeout(total=probe_timeout)
        self.retry_after = str(retry_after)  # the Retry-After value, seconds
        self._state = State.UNKNOWN
        self._reason = "not probed yet"
        self._since = time.time()
        self._agent_present: bool | None = None
        # Times the agent became reachable (the metrics' connects and reconnects).
        self.agent_connects = 0
        # The model server has no Ollama API (`/api/version` answered 404: llama.cpp, vLLM), as
        # the last probe found; False until a probe says so.
        self.openai_only = False
        self._connected = False
        # time.monotonic() of the last response headers a request got from this upstream.
        self.answered_at = 0.0
        self._waiting: set[Waiting] = set()
        self._wake = asyncio.Event()
        self._changed = asyncio.Event()  # set, then replaced, on every state change

    def rebase(self, base_url: str) -> None:
        """Probe the model server at `base_url` from now on (an agent's new forward)."""
        self._url = f"{base_url}/api/version"
        self._models_url = f"{base_url}/v1/models"

    @property
    def state(self) -> State:
        return self._state

    @property
    def status(self) -> Status:
        return Status(self._state, self._reason, self._since, self._agent_present)

    @property
    def agent_connected(self) -> bool:
        """The tunnel is up: the SSH server says so or, presence unknown, the probe reaches it."""
        if self._agent_present is not None:
            return self._agent_present
        return self._state in (State.UP, State.MODEL_SERVER_DOWN, State.MODEL_SERVER_REFUSES)

    def _count_connect(self) -> None:
        connected = self.agent_connected
        if connected and not self._connected:
            self.agent_connects += 1
        self._connected = connected

    @property
    def reachable(self) -> bool:
        """Connected, and its tunnel not silent: `refusal()` is None (without making an error)."""
        return self._agent_present is not False and self._state not in _UNREACHABLE

    def refusal(self) -> EdgeError | None:
        """The error to answer at once, or None if a request should go upstream.

        Only an absent agent or a silent tunnel is refused without trying: those would make a
        request wait for a timeout. A model server that failed a probe is still tried, since a
        try fails fast (the agent resets the connection) and a probe can land in a blip (sshd
        tearing down an old session), which must not turn into 502s for the next half second.
        """
        if not self.reachable:
            return AgentUnavailable(
                "the model server is offline: its workstation is not connected",
                headers={"Retry-After": self.retry_after},
            )
        return None

    def unready(self) -> EdgeError | None:
        """Why `/readyz` is not ready: a refusal, or a model server that failed its probe."""
        refusal = self.refusal()
        if refusal is not None:
            return refusal
        if self._state is State.MODEL_SERVER_DOWN:
            return UpstreamUnavailable(
                "the workstation is connected but its model server is not answering",
                headers={"Retry-After": self.retry_after},
            )
        if self._state is State.MODEL_SERVER_REFUSES:
            return _refused(self._reason)
        return None

    def refused(self, status: int) -> UpstreamRefused:
        """A request the model server answered 401 or 403: the state that shows (the probe
        looks again at once), and the error to answer it with."""
        reason = f"request answered {status}"
        self.report(State.MODEL_SERVER_REFUSES, reason)
        return _refused(reason)

    def absent_at_start(self) -> None:
        """An agent that has not connected yet: absent, without the warning a departure gets."""
        self._agent_present = False
        self._state, self._reason = State.AGENT_ABSENT, "not connected yet"

    def set_agent_present(self, present: bool | None) -> None:
        """Presence from the embedded SSH server; None when presence cannot be known."""
        if present == self._agent_present:
            return
        self._agent_present = present
        self._log.info("upstream.agent_presence", present=present)
        if present is False:
            self._set(State.AGENT_ABSENT, "agent disconnected")
        elif present and self._state in (State.AGENT_ABSENT, State.TUNNEL_SILENT):
            # Its forward is up now: let requests through at once; the probe confirms.
            self._set(State.UNKNOWN, "agent connected; probing")
        self._count_connect()
        self._wake.set()  # probe now: a new agent should be usable at once

    def report(self, state: State, reason: str) -> None:
        """What a request saw (a refused connect, a reset): takes effect at once."""
        self._set(state, reason)
        self._wake.set()

    async def wait_state(self, state: State) -> None:
        """Return once the upstream is in `state` (at once if it is); bound it with a timeout."""
        while self._state is not state:
            await self._changed.wait()

    def waiting(self, read_timeout: float) -> Waiting:
        """`async with` it around a wait for response headers: the wait ends early if the
        upstream goes down.

        Error handling: raises `TimeoutError` when the read timeout passes or the monitor
        decides the upstream is down (the `Waiting`'s `woken` then says so).
        """
        return Waiting(self._waiting, read_timeout)

    def _set(self, state: State, reason: str) -> None:
        if state is self._state:
            self._reason = reason
            return
        previous, self._state, self._reason, self._since = self._state, state, reason, time.time()
        self._changed.set()
        self._changed = asyncio.Event()
        self._count_connect()
        if state is State.UP:
            self._log.info("upstream.up", previous=previous.value)
        elif state is State.UNKNOWN:
            self._log.info("upstream.probing", previous=previous.value, reason=reason)
        else:
            self._log.warning("upstream.down", state=state.value, reason=reason)
            if state in (State.TUNNEL_SILENT, State.AGENT_ABSENT):
                now = asyncio.get_running_loop().time()
                for waiting in list(self._waiting):
                    waiting.wake(now)

    async def probe(self, session: aiohttp.ClientSession) -> State:
        """Ask the model server for its version once, through the tunnel; record and return.

        A server without Ollama's API (llama.cpp, vLLM: 404) is asked for `/v1/models` as well:
        vLLM checks its API key only on paths under `/v1`, so its 404 says nothing of whether
        it would take the edge's credential (llama.cpp checks the key before routing, so its
        404 does; its `/v1/models` is public).
        """
        started = time.monotonic()
        try:
            status = await self._ask(session, self._url)
            self.openai_only = status == 404
            if status == 404:
                status = await self._ask(session, self._models_url)
            self._set(classify_answer(status), f"probe answered {status}")
        except (aiohttp.ClientError, TimeoutError) as exc:
            still_cancelled()
            seen = classify(exc)
            assert seen is not None  # classify() reads every aiohttp failure and timeout
            state, reason = seen
            if state is State.TUNNEL_SILENT and self.answered_at > started:
                # Requests got answers while the probe waited: the tunnel is not silent, the
                # model server is only busy (a probe queues behind generations there).
                self._log.info("upstream.probe_slow", reason=reason)
                return self._state
            self._set(state, f"probe: {reason}")
        return self._state

    async def _ask(self, session: aiohttp.ClientSession, url: str) -> int:
        async with session.get(url, timeout=self.probe_timeout) as response:
            await response.read()
            return response.status

    async def run(
        self,
        session: aiohttp.ClientSession,
        after: Callable[[State], Awaitable[None]] | None = None,
    ) -> None:
        """Probe forever: every `probe_interval` while up, faster while down; `after` is
        awaited with the state each probe found."""
        while True:
            # Cleared before the probe, so a wake-up that arrives during it is not lost.
            self._wake.clear()
            if self._agent_present is not False:  # an absent agent's port has nothing behind it
                state = await self.probe(session)
                if after is not None:
                    await after(state)
            interval = self._probe_interval if self._state is State.UP else _DOWN_PROBE_INTERVAL_S
            try:
                async with asyncio.timeout(interval):
                    await self._wake.wait()
            except TimeoutError:
                pass


def _refused(reason: str) -> UpstreamRefused:
    return UpstreamRefused(
        f"the model server refuses the edge's credential ({reason}); the operator must set "
        "BACKHAUL_EDGE_UPSTREAM_API_KEY_FILE to its API key. Your own API key is not the cause."
    )
