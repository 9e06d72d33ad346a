"""`Agent`: one workstation's model server in the pool, reached through its tunnel's loopback end.

It bundles what belongs to one GPU: the base URL the edge sends to (the agent's forward), the
monitor that knows whether anything answers there, its slots (it is the gate's `Seat`: its
`max_inflight`), what it serves (its models, and which are loaded), how fast it decodes, and
whether it is cooling down after failures. The pool (`edge.upstreams.pool`) chooses among these;
the request path sends through the edge's sessions and translates what went wrong with
`errors()`.

What it knows of its model server is refreshed by `run()`, its probe loop: the liveness probe
(`UpstreamMonitor`), then, while the server is up, its loaded models (`/api/ps`) every probe and
its installed models (`/api/tags`, or `/v1/models` on an OpenAI-only server) every
`_MODELS_EVERY` probes and whenever it comes (back) up.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from types import TracebackType
from typing import Any

import aiohttp
import orjson
import structlog

from edge.errors import ConnectionLost, UpstreamTimeout, UpstreamUnavailable
from edge.models import canonical_model
from edge.upstreams.base import State, classify
from edge.upstreams.gate import Seat
from edge.upstreams.monitor import UpstreamMonitor, Waiting
from shared.runtime import still_cancelled

log = structlog.get_logger(__name__)

# Installed models are asked for every this many probes (and on every return to up); loaded
# ones every probe, since a load or an unload changes where a request is best sent.
_MODELS_EVERY = 3
# Failures in a row (before any byte reached a client) that cool an agent down, the first
# cooldown, and its cap: LiteLLM's 3 failures / 5 s, doubling to Olla's 60 s.
COOL_AFTER = 3
COOL_FIRST_S = 5.0
COOL_MAX_S = 60.0
# The states in which a reachable agent's model server takes requests (unknown: not probed yet).
SERVING = (State.UP, State.UNKNOWN)
# Weight of the newest decode-speed sample in the average.
_SPEED_WEIGHT = 0.3


class Agent(Seat):
    """One workstation: its URL, monitor, slots, models, speed and cooldown."""

    def __init__(self, name: str, url: str, monitor: UpstreamMonitor, capacity: int) -> None:
        super().__init__(capacity)
        self.name = name
        self.url = url  # base URL of the forward's loopback end, `http://127.0.0.1:41234`
        self.monitor = monitor
        # Canonical names (`edge.models.canonical_model`); None until its server has told.
        self.models: frozenset[str] | None = None
        self.listed: list[str] = []  # the names as its server spells them, for operators
        self.loaded: frozenset[str] = frozenset()
        self.s_per_token: float | None = None  # decode-speed average, seconds per token
        self.tokens = 0  # generated tokens served, for the metrics
        self.failures = 0  # in a row, before a first byte
        self.cool_until = 0.0  # time.monotonic() until which it is only a last resort
        self._cool_s = 0.0
        self._probes = 0
        self._connects = 0  # its monitor's count of connections at the last look
        # Set once a probe (and its look at the models) is over: the tests wait for it.
        self.refreshed = asyncio.Event()
        # Its server was asked for its models since it came up (answered or not): until then
        # it is only a last resort, or it would be sent models it may not have.
        self.looked = False

    def __repr__(self) -> str:
        return f"Agent({self.name!r}, {self.url!r})"

    # What the pool asks.

    def serves(self, model: str | None) -> bool:
        """Whether its server has `model` (a canonical name); one that has not said yet, or a
        request naming no model, counts as served: the server answers for itself."""
        return model is None or self.models is None or model in self.models

    @property
    def reachable(self) -> bool:
        """Connected and its tunnel answering: a request sent now would reach its server."""
        return self.monitor.reachable

    @property
    def healthy(self) -> bool:
        """Reachable, and its server neither failing its probe nor refusing the edge's key."""
        return self.looked and self.reachable and self.monitor.state in SERVING

    def cooling(self, now: float) -> bool:
        return now < self.cool_until

    # What requests report.

    def succeeded(self, tok_per_s: float | None) -> None:
        """A request was answered: the failure run ends; a decode speed joins the average."""
        self.failures = 0
        self._cool_s = 0.0
        if tok_per_s:
            sample = 1.0 / tok_per_s
            old = self.s_per_token
            self.s_per_token = sample if old is None else old + _SPEED_WEIGHT * (sample - old)

    def failed(self, reason: str) -> None:
        """A request failed here before its first byte; the third in a row cools it down."""
        self.failures += 1
        if self.failures < COOL_AFTER:
            return
        self._cool_s = min(COOL_MAX_S, self._cool_s * 2 or COOL_FIRST_S)
        self.cool_until = time.monotonic() + self._cool_s
        log.warning(
            "pool.agent_cooling", agent=self.name, seconds=self._cool_s, failures=self.failures,
            reason=reason,
        )  # fmt: skip

    # Its model server, through the tunnel.

    async def run(self, session: aiohttp.ClientSession, changed: Callable[[], None]) -> None:
        """Probe forever (`UpstreamMonitor.run`), refreshing the models while up; `changed` is
        called after every probe, since any may have made room for a waiting request."""

        async def after(state: State) -> None:
            await self._after_probe(session, state)
            changed()

        await self.monitor.run(session, after)

    async def check(self, session: aiohttp.ClientSession) -> None:
        """Probe once now, and look at the models if it is up (`/readyz` on a fresh edge)."""
        await self._after_probe(session, await self.monitor.probe(session))

    async def _after_probe(self, session: aiohttp.ClientSession, state: State) -> None:
        up = state is State.UP
        if up:
            # Every model is asked for again when it comes back up or reconnected: it may be
            # another machine under the same name, or have pulled models meanwhile.
            again = not self.looked or self.monitor.agent_connects != self._connects
            every = self._probes % _MODELS_EVERY == 0
            await self.refresh(session, installed=every or again)
            self._probes += 1
            self._connects = self.monitor.agent_connects
        self.looked = up
        self.refreshed.set()

    async def refresh(self, session: aiohttp.ClientSession, *, installed: bool = True) -> None:
        """Ask its server what it has (`installed`) and what is loaded; a failed ask keeps
        what was known (the next probe will say whether the server is down)."""
        timeout = self.monitor.probe_timeout
        try:
            if self.monitor.openai_only:
                # llama.cpp and vLLM list what they serve, and have it loaded.
                listing = await _get_json(session, f"{self.url}/v1/models", timeout)
                names = _names(listing, "data")
                self._set_models(names)
                self.loaded = frozenset(self.models or ())
                if len(names) == 1 and _says_llama_cpp(listing):
                    self.models = None  # one model, whatever name a request gives: it is that
                return
            if installed:
                listing = await _get_json(session, f"{self.url}/api/tags", timeout)
                self._set_models(_names(listing, "models"))
            running = await _get_json(session, f"{self.url}/api/ps", timeout)
            self.loaded = frozenset(canonical_model(n) for n in _names(running, "models"))
        except (aiohttp.ClientError, TimeoutError, ValueError) as exc:
            still_cancelled()
            log.info("pool.models_unknown", agent=self.name, error=str(exc) or repr(exc))

    def _set_models(self, names: list[str]) -> None:
        models = frozenset(canonical_model(n) for n in names)
        if models != self.models:
            log.info("pool.models", agent=self.name, models=sorted(names))
        self.models, self.listed = models, sorted(names)

    def errors(self, waiting: Waiting | None = None) -> _Errors:
        """`with` it around a request to the agent: aiohttp client failures before response
        headers become our errors, with the state each shows (`classify`, the probe's own
        table) reported to the monitor.

        `waiting` is the wait for headers: when the monitor ended it because the connection
        went (an agent replaced by its own reconnect, a tunnel gone silent), the request did
        not time out; it is `ConnectionLost`, which the pool retries.
        """
        return _Errors(self.monitor, waiting)


class _Errors:
    """`Agent.errors()`: a class, not a generator-based context manager, because it is on every
    request's path twice."""

    __slots__ = ("_monitor", "_waiting")

    def __init__(self, monitor: UpstreamMonitor, waiting: Waiting | None) -> None:
        self._monitor = monitor
        self._waiting = waiting

    def __enter__(self) -> None:
        return None

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if exc is None:
            return
        monitor = self._monitor
        if isinstance(exc, aiohttp.ClientConnectorError | aiohttp.ConnectionTimeoutError):
            state, reason = classify(exc) or (State.AGENT_ABSENT, str(exc))
            monitor.report(state, f"request: {reason}")
            refusal = monitor.refusal()  # AgentUnavailable now, worded in one place
            assert refusal is not None
            raise refusal from exc
        if isinstance(exc, TimeoutError):  # the read timeout, or the monitor woke us
            waiting = self._waiting
            if waiting is not None and waiting.woken:
                raise ConnectionLost(
                    "the workstation's connection was lost while it was answering",
                    headers={"Retry-After": monitor.retry_after},
                ) from exc
            refusal = monitor.refusal()
            if refusal is not None:
                raise refusal from exc
            raise UpstreamTimeout("the model server did not answer in time") from exc
        if isinstance(exc, aiohttp.ClientError):  # accepted, then reset: its model server is down
            state, reason = classify(exc) or (State.MODEL_SERVER_DOWN, str(exc))
            monitor.report(state, f"request: {reason}")  # not a refusal: the probe looks again
            raise UpstreamUnavailable(
                "the workstation is connected but its model server did not answer",
                headers={"Retry-After": monitor.retry_after},
            ) from exc


async def _get_json(session: aiohttp.ClientSession, url: str, limit: aiohttp.ClientTimeout) -> Any:
    async with session.get(url, timeout=limit) as response:
        body = await response.read()
        if response.status != 200:
            raise ValueError(f"{url} answered {response.status}")
        return orjson.loads(body)


def _says_llama_cpp(listing: Any) -> bool:
    """A `llama-server` with one model (not its router mode) answers a request for any model
    name with that model (tools/server: the name is not checked)."""
    data = listing.get("data") if isinstance(listing, dict) else None
    return isinstance(data, list) and any(
        isinstance(item, dict) and item.get("owned_by") == "llamacpp" for item in data
    )


def _names(listing: Any, field: str) -> list[str]:
    """The model names in an Ollama (`models[].name`) or OpenAI (`data[].id`) listing."""
    items = listing.get(field) if isinstance(listing, dict) else None
    if not isinstance(items, list):
        raise ValueError(f"no {field} list")
    names = []
    for item in items:
        if isinstance(item, dict):
            name = item.get("name") or item.get("model") or item.get("id")
            if isinstance(name, str) and name:
                names.append(name)
    return names
