"""The Ollama simulator as an aiohttp app: a model server with no model behind it.

It owns what a client of Ollama can observe apart from the bytes themselves (those are
`simulator.wire`'s): which routes exist and what status each answers, pacing on the event
loop's clock (time to first token, then tokens per second), Ollama's scheduler as seen from
outside (`parallel` slots, a queue of `max_queue`, 503 beyond it), generation stopping when the
client goes away, and a `SimulatorStats` record of what reached it, so tests can assert on the
upstream's side of the edge. Serving it is `simulator.serve`'s job.
"""

from __future__ import annotations

import asyncio
import dataclasses
import itertools
import time
from collections.abc import AsyncGenerator, AsyncIterator, Callable, Iterator
from contextlib import aclosing, asynccontextmanager
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import orjson
from aiohttp import web
from aiohttp.typedefs import Handler
from multidict import CIMultiDictProxy
from pydantic import BaseModel, ConfigDict, Field

from simulator import formats, gojson, wire
from simulator import models as catalogue

KEEP_ALIVE_S = 300.0  # Ollama's OLLAMA_KEEP_ALIVE default (5m): how long a model stays in /api/ps
MAX_BODY_BYTES = 128 * 1024 * 1024  # Ollama sets no limit; ours only has to exceed the edge's
BUSY = "server busy, please try again.  maximum pending requests exceeded"  # sic, two spaces


class SimulatorSettings(BaseModel):
    """How the simulated model server behaves; frozen, built once and passed down."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    tok_per_s: float = Field(default=0.0, ge=0)  # decode speed; 0 = as fast as possible
    ttft: float = Field(default=0.0, ge=0)  # seconds from being scheduled to the first token
    reply_tokens: int = Field(default=32, ge=0)  # reply length when no limit cuts it short
    models: tuple[str, ...] = catalogue.DEFAULT_MODELS
    parallel: int = Field(default=1, ge=1)  # OLLAMA_NUM_PARALLEL
    max_queue: int = Field(default=512, ge=0)  # OLLAMA_MAX_QUEUE


@dataclass(frozen=True, slots=True)
class SeenRequest:
    """One request as it reached the simulator: the upstream's view, for tests."""

    method: str
    path: str
    body: Any  # the parsed JSON body; None when there was none or it was not JSON
    headers: CIMultiDictProxy[str]
    # The body as Ollama's Go server decodes it into the route's request struct (by json tag,
    # the fields set: `simulator.gojson`); None without a body or a struct for the path.
    # What the model server acted on: the edge's rules are checked against this.
    decoded: dict[str, Any] | None = None


@dataclass(eq=False)
class SimulatorStats:
    """What reached the simulator and what became of it; tests wait on it with `wait_*`."""

    requests: list[SeenRequest] = field(default_factory=list)
    active: int = 0  # handlers running now, any route
    queued: int = 0  # waiting for a generation slot
    generating: int = 0  # holding a slot
    peak_generating: int = 0
    cancelled: int = 0  # handlers ended by their client going away
    _changed: asyncio.Event = field(default_factory=asyncio.Event, repr=False)

    def _notify(self) -> None:
        # Wake every waiter, then arm a fresh event for the next change.
        self._changed.set()
        self._changed = asyncio.Event()

    async def wait_for(self, predicate: Callable[[SimulatorStats], bool]) -> None:
        """Return once `predicate(self)` holds. Unbounded: callers wrap it in `asyncio.timeout`."""
        while not predicate(self):
            await self._changed.wait()

    async def wait_cancelled(self, n: int = 1) -> None:
        await self.wait_for(lambda s: s.cancelled >= n)

    async def wait_requests(self, n: int) -> None:
        await self.wait_for(lambda s: len(s.requests) >= n)

    async def wait_generating(self, n: int) -> None:
        await self.wait_for(lambda s: s.generating >= n)

    async def wait_queued(self, n: int) -> None:
        await self.wait_for(lambda s: s.queued >= n)


class _Slots:
    """Ollama's scheduler as a client sees it: `parallel` slots, then a queue of `max_queue`."""

    def __init__(self, settings: SimulatorSettings, stats: SimulatorStats) -> None:
        self._free = asyncio.Semaphore(settings.parallel)
        self._max_queue = settings.max_queue
        self._stats = stats

    @asynccontextmanager
    async def hold(self) -> AsyncIterator[None]:
        stats = self._stats
        if self._free.locked() and stats.queued >= self._max_queue:
            raise wire.WireError(503, BUSY)
        stats.queued += 1
        stats._notify()
        try:
            await self._free.acquire()
        finally:
            stats.queued -= 1
            stats._notify()
        stats.generating += 1
        stats.peak_generating = max(stats.peak_generating, stats.generating)
        stats._notify()
        try:
            yield
        finally:
            stats.generating -= 1
            self._free.release()
            stats._notify()


@dataclass(eq=False)
class _State:
    settings: SimulatorSettings
    stats: SimulatorStats
    slots: _Slots
    models: frozenset[str]  # canonical names
    loaded: dict[str, float] = field(default_factory=dict)  # canonical name -> unix expiry
    started: float = field(default_factory=time.time)  # every model's modified_at
    ids: Iterator[int] = field(default_factory=lambda: itertools.count(1))

    def touch(self, model: str, keep_alive_s: float) -> None:
        self.loaded[catalogue.model_key(model)] = time.time() + keep_alive_s


SIM_STATS = web.AppKey("sim_stats", SimulatorStats)
_STATE = web.AppKey("sim_state", _State)
_BODY: web.RequestKey[Any] = web.RequestKey("sim_body")


class _Generation:
    """One reply's tokens on the configured pace, measured the way Ollama measures itself.

    Pacing follows the event loop's clock; the figures are read from `perf_counter_ns`, because
    uvloop's loop clock ticks in whole milliseconds and would round short phases to zero.
    """

    def __init__(self, settings: SimulatorSettings, job: wire.Job, arrived_ns: int) -> None:
        length = settings.reply_tokens
        if job.format is None and 0 < job.limit < length:
            # Free text is cut at the limit: build only what is sent, and one more to know it was
            # cut (a 100,000-token reply built for a 64-token answer cost 12 ms a request).
            length = job.limit + 1
        whole = formats.tokens(job.format, length)
        cut = 0 < job.limit < len(whole)
        self.tokens = whole[: job.limit] if cut else whole
        self.reason = "length" if cut else "stop"
        self._job, self._settings = job, settings
        self.arrived = self.scheduled = self.prefilled = self.decoded = arrived_ns

    async def produce(self) -> AsyncGenerator[str, None]:
        self.scheduled = time.perf_counter_ns()
        rate = self._settings.tok_per_s
        interval = 1.0 / rate if rate else 0.0
        # The first token leaves at `ttft`: prefill takes what one decode step does not.
        await asyncio.sleep(max(self._settings.ttft - interval, 0.0))
        self.prefilled = self.decoded = time.perf_counter_ns()
        loop = asyncio.get_running_loop()
        start = loop.time()
        for i, token in enumerate(self.tokens):
            if interval:
                # An absolute schedule: time spent writing chunks does not slow the pace.
                await asyncio.sleep(max(start + (i + 1) * interval - loop.time(), 0.0))
            self.decoded = time.perf_counter_ns()
            yield token

    def metrics(self) -> wire.Metrics:
        return wire.Metrics(
            total_ns=time.perf_counter_ns() - self.arrived,
            load_ns=self.scheduled - self.arrived,  # queue wait + load, as Ollama counts it
            prompt_tokens=self._job.prompt_tokens,
            prompt_ns=self.prefilled - self.scheduled,
            eval_tokens=len(self.tokens),
            eval_ns=self.decoded - self.prefilled,
        )


def _json(obj: Any, status: int = 200) -> web.Response:
    return web.json_response(obj, status=status, dumps=lambda o: orjson.dumps(o).decode())


async def _generate(
    request: web.Request, state: _State, job: wire.Job, reply: wire.Reply, keep_alive: float
) -> web.StreamResponse:
    arrived = time.perf_counter_ns()
    async with state.slots.hold():
        state.touch(job.model, keep_alive)
        gen = _Generation(state.settings, job, arrived)
        async with aclosing(gen.produce()) as tokens:
            if not job.stream:
                text = "".join([token async for token in tokens])
                return _json(reply.done(text, gen.reason, gen.metrics()))
            # Like Ollama, no headers before the first token: time to first byte includes
            # queueing and prefill. Each chunk is written, and drained, as it is produced.
            resp = web.StreamResponse()
            resp.content_type = reply.content_type
            async for token in tokens:
                if not resp.prepared:
                    await resp.prepare(request)
                await resp.write(reply.chunk(token))
            if not resp.prepared:
                await resp.prepare(request)
            await resp.write(reply.tail(gen.reason, gen.metrics()))
            await resp.write_eof()
            return resp


async def _load(state: _State, job: wire.Job, reply: wire.Reply, keep_alive: float) -> web.Response:
    """An empty prompt (or no messages) loads the model, or with `keep_alive: 0` unloads it."""
    if keep_alive == 0:
        state.loaded.pop(catalogue.model_key(job.model), None)
        return _json(reply.done("", "unload", None))
    async with state.slots.hold():
        state.touch(job.model, keep_alive)
    return _json(reply.done("", "load", None))


async def _native(request: web.Request, chat: bool) -> web.StreamResponse:
    state, body = request.app[_STATE], wire.request_object(request[_BODY])
    model = wire.require_model(body, state.models)
    options = body.get("options") or {}
    content = body.get("messages") if chat else body.get("prompt")
    prompt_tokens = wire.words(content) + (0 if chat else wire.words(body.get("system")))
    limit = gojson.option_int(options, "num_predict") or 0
    job = wire.Job(model, chat, body.get("stream") is not False, prompt_tokens, limit)
    if "completion" not in catalogue.facts(model).capabilities:
        raise wire.WireError(400, f'"{model}" does not support {"chat" if chat else "generate"}')
    keep_alive = wire.keep_alive_s(body.get("keep_alive"), KEEP_ALIVE_S)
    if not content:
        return await _load(state, job, wire.NativeReply(job), keep_alive)
    job = dataclasses.replace(job, format=formats.native(body.get("format")))
    return await _generate(request, state, job, wire.NativeReply(job), keep_alive)


async def _openai(request: web.Request, chat: bool) -> web.StreamResponse:
    state, body = request.app[_STATE], wire.request_object(request[_BODY])
    content = body.get("messages") if chat else body.get("prompt")
    if chat and not content:
        raise wire.WireError(400, "[] is too short - 'messages'")
    model = wire.require_model(body, state.models)
    options = body.get("stream_options") or {}
    include_usage = isinstance(options, dict) and options.get("include_usage") is True
    # Ollama reads `max_tokens` only; `max_completion_tokens` is ignored (ollama/ollama#7125).
    limit = body.get("max_tokens") or 0
    fmt = formats.native(formats.openai(body.get("response_format")))  # chat only: None here
    job = wire.Job(model, chat, body.get("stream") is True, wire.words(content), limit, fmt)
    ident = f"{'chatcmpl' if chat else 'cmpl'}-{next(state.ids) % 999}"
    reply = wire.OpenAIReply(job, ident, int(time.time()), include_usage)
    if not content:
        return await _load(state, job, reply, KEEP_ALIVE_S)
    return await _generate(request, state, job, reply, KEEP_ALIVE_S)


async def _embed(request: web.Request) -> web.Response:
    state, body = request.app[_STATE], wire.request_object(request[_BODY])
    legacy, openai = request.path == "/api/embeddings", request.path == "/v1/embeddings"
    fmt = body.get("encoding_format") or "float"
    if openai and fmt not in ("float", "base64"):
        allowed = "Supported values: ['float', 'base64']."
        raise wire.WireError(400, f"Invalid value for 'encoding_format' = {fmt}. {allowed}")
    texts = wire.embed_inputs(body.get("prompt" if legacy else "input"), openai)
    model = wire.require_model(body, state.models)
    if not texts:
        return _json({"embedding": []} if legacy else {"model": model, "embeddings": []})
    full = catalogue.facts(model).embedding_length
    dims = min(wire.int_field(body.get("dimensions"), "dimensions") or full, full)
    keep_alive = wire.keep_alive_s(body.get("keep_alive"), KEEP_ALIVE_S)
    arrived = time.perf_counter_ns()
    async with state.slots.hold():
        state.touch(model, keep_alive)
        scheduled = time.perf_counter_ns()
        vectors = [wire.embedding(model, text, dims, normalize=not legacy) for text in texts]
    if legacy:
        return _json({"embedding": vectors[0]})
    if openai:
        return _json(wire.openai_embeddings(model, vectors, fmt, wire.words(texts)))
    total_ns = time.perf_counter_ns() - arrived
    return _json(wire.embed_body(model, vectors, wire.words(texts), total_ns, scheduled - arrived))


async def _root(request: web.Request) -> web.Response:
    return web.Response(text="Ollama is running")


async def _catalogue(request: web.Request) -> web.Response:
    """The read-only routes: version, tags, ps, show and the /v1 model list and lookup."""
    state, path = request.app[_STATE], request.path
    modified, created = wire.timestamp(state.started), int(state.started)
    if path == "/api/version":
        return _json({"version": wire.VERSION})
    if path == "/api/tags":
        return _json({"models": [catalogue.tags_entry(m, modified) for m in state.settings.models]})
    if path == "/api/ps":
        return _json(wire.ps_body(state.loaded, time.time()))
    if path == "/v1/models":
        names = [catalogue.canonical(m) for m in state.settings.models]
        return _json(
            {"object": "list", "data": [catalogue.openai_model(n, created) for n in names]}
        )
    if path == "/api/show":
        body = wire.request_object(request[_BODY])
        name = body.get("model") or body.get("name")  # `name` is the deprecated spelling
    else:
        name = request.match_info["model"]
    if not isinstance(name, str) or not name:
        raise wire.WireError(400, "model is required")
    if catalogue.model_key(name) not in state.models:
        raise wire.WireError(404, f"model '{name}' not found")  # ShowHandler's wording
    if path == "/api/show":
        return _json(catalogue.show_body(name, modified))
    return _json(catalogue.openai_model(name, created))


async def _read_body(request: web.Request) -> tuple[Any, dict[str, Any] | None, str | None]:
    """The body parsed, the body decoded as Ollama would (`gojson`), and what was wrong."""
    raw = await request.read() if request.can_read_body else b""
    if not raw.strip():
        return None, None, None
    try:
        body = orjson.loads(raw)  # strict JSON first: Python's json takes NaN, Go does not
    except orjson.JSONDecodeError as exc:
        return None, None, str(exc)
    try:
        return body, gojson.decode(request.path, gojson.parse(raw)), None
    except gojson.DecodeError as exc:
        return body, None, str(exc)


@web.middleware
async def _observe(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Record the request, apply Ollama's guards, render errors; count disconnects."""
    stats = request.app[SIM_STATS]
    body, decoded, invalid = await _read_body(request)
    request[_BODY] = body if decoded is None else decoded
    seen = SeenRequest(request.method, request.path, body, request.headers, decoded)
    stats.requests.append(seen)
    stats.active += 1
    stats._notify()
    try:
        origin, host = request.headers.get("Origin"), request.host
        if not wire.host_allowed(host) or not wire.origin_allowed(origin, host):
            return web.Response(status=403)  # Ollama's bare 403, no body
        if invalid is not None:
            raise wire.WireError(400, invalid)
        return await handler(request)
    except wire.WireError as exc:
        return _json(wire.error_body(request.path, exc.status, exc.message), exc.status)
    except gojson.DecodeError as exc:  # an option of the wrong type, read after decoding
        return _json(wire.error_body(request.path, 400, str(exc)), 400)
    except (web.HTTPNotFound, web.HTTPMethodNotAllowed):
        return web.Response(status=404, text="404 page not found")  # gin's answer
    except (asyncio.CancelledError, ConnectionResetError):
        # The client went away mid-request; Ollama stops generating then. Count, never swallow.
        stats.cancelled += 1
        raise
    finally:
        stats.active -= 1
        stats._notify()


def create_simulator_app(settings: SimulatorSettings) -> web.Application:
    """The simulator as an aiohttp app; its `SimulatorStats` is at `app[SIM_STATS]`.

    Serve it with `handler_cancellation=True` (as `start_simulator` does) so a client hanging
    up cancels its generation, as in Ollama.
    """
    stats = SimulatorStats()
    app = web.Application(middlewares=[_observe], client_max_size=MAX_BODY_BYTES)
    app[SIM_STATS] = stats
    served = frozenset(catalogue.model_key(m) for m in settings.models)
    app[_STATE] = _State(settings, stats, _Slots(settings, stats), served)
    for path in ("/api/version", "/api/tags", "/api/ps", "/v1/models", "/v1/models/{model}"):
        app.router.add_get(path, _catalogue)
    app.router.add_get("/", _root)
    app.router.add_post("/api/show", _catalogue)
    app.router.add_post("/api/generate", partial(_native, chat=False))
    app.router.add_post("/api/chat", partial(_native, chat=True))
    app.router.add_post("/v1/completions", partial(_openai, chat=False))
    app.router.add_post("/v1/chat/completions", partial(_openai, chat=True))
    for path in ("/api/embed", "/api/embeddings", "/v1/embeddings"):
        app.router.add_post(path, _embed)
    return app
