"""`RedisLink`: the edge's connection to the Redis that several edges share (DESIGN.md §7.3).

One edge needs no Redis; with `redis_url` set, the policy stores (`edge.cluster.limits`, `bans`,
`keys`, `leases`) share their state through this link. What it owns:

- **The client** (`redis.asyncio` with hiredis's parser) and the one rule every caller keeps: no
  request waits on Redis longer than `redis_timeout` (50 ms by default: a same-region round trip
  is a tenth of a millisecond; Envoy allows 20 ms, LiteLLM 100 ms). `call()` bounds each use.
- **A breaker.** `_BREAK_AFTER` failures in a row open it, and so does one call that used up the
  whole timeout (a silent Redis: the next call would cost another timeout, and a request makes
  two, the limits and the gate's lease; so no request waits on Redis much past one timeout):
  callers are told at once that Redis is away (`RedisDown`) and fall back to their local state;
  the link's loop pings every `_PROBE_S` and closes it on the first answer. The research's numbers
  (LiteLLM: 5 failures, 60 s) are for a cloud; a loopback or same-region Redis that answers again
  should be used again within seconds.
- **The edges' heartbeat**: each edge is a member of `bh:edges` scored by Redis's own clock,
  renewed every `_HEARTBEAT_S`; `edges` is how many answered within `_EDGE_TTL_S`. A limit falls
  back to `limit / edges` on each edge while Redis is away (`edge.cluster.limits`).
- **Scripts a request waits on** (its limits, its lease): `run_script()` sends those asked for
  in the same turn of the event loop in one pipeline (auto-pipelining, as ioredis and go-redis
  offer): under load, requests share their round trips; a lone one is a call of its own, since
  a pipeline of one costs more than a call (`_round_trip()`, which both kinds go through).
- **Writes no request waits on** (a lease going back, a tpm charge, their events): `later()`
  queues them for `WRITE_BEHIND_S` and sends every write queued meanwhile in one pipeline, one
  round trip. redis-py spends about 85 µs of CPU on a call whatever it carries, and a keyed
  request made two such calls after its answer; now the requests that end within the window
  share one (docs/performance.md, "Fewer Redis round trips").
- **Events** on the `bh:events` channel: a ban or a key change made on one edge reaches the others
  in well under a second (pub/sub), and after a reconnect each store reloads everything it
  shares (`resync`), since events sent meanwhile are lost.

Resource handling: `open_link()` connects and `run()` (in the edge's task group) keeps the
heartbeat, the breaker's probe and the event subscription; the exit closes the connections.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any, TypeVar

import orjson
import redis.asyncio as aioredis
import structlog
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.commands.core import AsyncScript
from redis.exceptions import NoScriptError, RedisError

from shared.runtime import still_cancelled
from shared.secrets import read_key_file

log = structlog.get_logger(__name__)

T = TypeVar("T")

CHANNEL = "bh:events"
EDGES = "bh:edges"
_BREAK_AFTER = 3
_PROBE_S = 1.0
_HEARTBEAT_S = 2.0
_EDGE_TTL_S = 10.0
_RESUBSCRIBE_S = 1.0
# How long a write no request waits on is held for others to share its round trip. A request's
# lease goes back when its upstream ends and its tpm is charged when its answer is counted, a
# fraction of a millisecond apart: both fit, and under load so do many requests' writes.
WRITE_BEHIND_S = 0.002

# A write for `later()`: a command's words (`("ZREM", key, member)`), or a registered script
# with its keys and arguments (`(script, [key], [arg, ...])`).
Write = tuple[Any, ...]

# Every script's first lines: now, in milliseconds, on Redis's clock (no skew between VPSes).
NOW_MS = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
"""
# Renew this edge's membership and count the live edges.
_HEARTBEAT = (
    NOW_MS
    + """
redis.call('ZADD', KEYS[1], now, ARGV[1])
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now - tonumber(ARGV[2]))
return redis.call('ZCARD', KEYS[1])
"""
)


class RedisDown(Exception):
    """Redis did not answer in time, failed, or the breaker is open: use the local state."""


# A script's reply, or the reason there is none (a result, not an exception on the future: the
# request that asked may be gone by then, and nobody would retrieve it).
_Reply = asyncio.Future[tuple[Any, RedisDown | None]]


Handler = Callable[[dict[str, Any]], None]
Resync = Callable[[], Awaitable[None]]


class RedisLink:
    """The shared Redis: bounded calls, the breaker, the heartbeat, the event channel."""

    def __init__(self, client: aioredis.Redis, timeout: float, edge_id: str) -> None:
        self.client = client
        self.timeout = timeout
        self.edge_id = edge_id
        self.edges = 1  # live edges, as the last heartbeat counted them
        self.failures = 0
        self.errors = 0  # every failed call, for the metrics
        self._open = False  # the breaker
        self._handlers: dict[str, Handler] = {}
        self._resyncs: list[Resync] = []
        self._down_listeners: list[Callable[[], None]] = []
        self._heartbeat = client.register_script(_HEARTBEAT)
        self._changed = asyncio.Event()
        self._asked: list[tuple[Write, _Reply]] = []  # by run_script(), this loop turn
        self._queued: list[tuple[tuple[Write, ...], asyncio.Future[bool]]] = []
        self._flush_at: asyncio.TimerHandle | None = None
        self._flushing: set[asyncio.Task[None]] = set()

    @property
    def up(self) -> bool:
        """The breaker is closed: calls go to Redis."""
        return not self._open

    def on(self, kind: str, handler: Handler) -> None:
        """Call `handler(event)` for every event of `kind` another edge publishes."""
        self._handlers[kind] = handler

    def on_resync(self, resync: Resync) -> None:
        """Await `resync()` whenever the link (re)connects: reload what is shared."""
        self._resyncs.append(resync)

    async def call(self, use: Callable[[], Awaitable[T]]) -> T:
        """`await use()` within the timeout; `RedisDown` when the breaker is open or it fails."""
        if self._open:
            raise RedisDown("the breaker is open")
        try:
            async with asyncio.timeout(self.timeout):
                result = await use()
        except TimeoutError as exc:
            still_cancelled()
            self._failed(exc, at_once=True)
            raise RedisDown("no answer within the timeout") from exc
        except (RedisError, OSError) as exc:
            still_cancelled()  # redis-py may report its own cancellation as a ConnectionError
            self._failed(exc)
            raise RedisDown(str(exc) or type(exc).__name__) from exc
        self.failures = 0
        return result

    async def run_script(self, script: AsyncScript, keys: list[str], args: list[str | int]) -> Any:
        """`script`'s reply for `keys` and `args`, as `call()` bounds it; `RedisDown` as there.
        Scripts asked for in the same turn of the event loop share one round trip."""
        if self._open:
            raise RedisDown("the breaker is open")
        loop = asyncio.get_running_loop()
        reply: _Reply = loop.create_future()
        self._asked.append(((script, keys, args), reply))
        if len(self._asked) == 1:
            loop.call_soon(self._send_asked)
        result, error = await reply
        if error is not None:
            raise error
        return result

    async def publish(self, kind: str, **fields: Any) -> None:
        """Tell the other edges (best effort: a lost event is made up by their next resync)."""
        _, channel, event = self.event(kind, **fields)
        with contextlib.suppress(RedisDown):
            await self.call(lambda: self.client.publish(channel, event))

    def event(self, kind: str, **fields: Any) -> Write:
        """The write that tells the other edges of `kind` (`publish()` sends it now, `later()`
        with the others)."""
        return ("PUBLISH", CHANNEL, orjson.dumps({"kind": kind, "from": self.edge_id, **fields}))

    def later(self, *writes: Write) -> asyncio.Future[bool]:
        """Send `writes`, in order, within `WRITE_BEHIND_S`, in one round trip with every other
        write queued meanwhile. The future says whether they reached Redis; it never raises
        (best effort, like the calls it replaces: a lease not given back expires, a charge
        not sent is in this edge's shadow of the limits)."""
        loop = asyncio.get_running_loop()
        done: asyncio.Future[bool] = loop.create_future()
        self._queued.append((writes, done))
        if self._flush_at is None:
            self._flush_at = loop.call_later(WRITE_BEHIND_S, self._flush_soon)
        return done

    async def drain(self) -> None:
        """Send the writes queued now and wait for every round trip on its way (at shutdown)."""
        if self._flush_at is not None:
            self._flush_at.cancel()
            self._flush_soon()
        if self._flushing:
            await asyncio.wait(self._flushing)

    def _send_asked(self) -> None:
        # Not what the requests that asked and went away since asked for (a lease nobody holds).
        batch = [(write, reply) for write, reply in self._asked if not reply.done()]
        self._asked = []
        if batch:
            self._spawn(self._send(batch))

    def _flush_soon(self) -> None:
        self._flush_at = None
        batch, self._queued = self._queued, []
        self._spawn(self._flush(batch))

    def _spawn(self, sending: Coroutine[Any, Any, None]) -> None:
        """A round trip in a task of its own, kept until done (`drain()` waits for it)."""
        task = asyncio.get_running_loop().create_task(sending)
        self._flushing.add(task)
        task.add_done_callback(self._flushing.discard)

    async def _send(self, batch: list[tuple[Write, _Reply]]) -> None:
        try:
            replies = await self._round_trip([write for write, _ in batch])
            for (_, reply), result in zip(batch, replies, strict=True):
                if isinstance(result, RedisDown):
                    _answer(reply, None, result)
                elif isinstance(result, Exception):  # Redis answered with an error
                    self._failed(result)
                    _answer(reply, None, RedisDown(str(result) or type(result).__name__))
                else:
                    _answer(reply, result, None)
        finally:
            for _, reply in batch:  # cancelled with the edge
                _answer(reply, None, RedisDown("the edge is stopping"))

    async def _flush(self, batch: list[tuple[tuple[Write, ...], asyncio.Future[bool]]]) -> None:
        try:
            replies = iter(await self._round_trip([w for writes, _ in batch for w in writes]))
            for writes, done in batch:
                sent = True
                # This entry's replies, taken from all of them (`writes` first: none more).
                for write, reply in zip(writes, replies, strict=False):
                    if isinstance(reply, Exception):
                        sent = False
                        if not isinstance(reply, RedisDown):  # Redis answered with an error
                            name = write[0] if isinstance(write[0], str) else "EVALSHA"
                            log.warning("redis.write_failed", error=repr(reply), command=name)
                if not done.done():
                    done.set_result(sent)
        finally:
            for _, done in batch:  # cancelled with the edge: nobody is left to tell otherwise
                if not done.done():
                    done.set_result(False)

    async def _round_trip(self, writes: list[Write]) -> list[Any]:
        """Each write's reply, the writes sent in one pipeline; a lone script is a call of its
        own, as a pipeline of one costs more. Where a write failed its reply is the exception:
        Redis's error, or `RedisDown` for every write when Redis is away. A script Redis forgot
        (a restart) is run once more on its own, which loads it."""
        if len(writes) == 1 and isinstance(writes[0][0], AsyncScript):
            return [await self._script(writes[0])]
        pipe = self.client.pipeline(transaction=False)
        for write in writes:
            if isinstance(write[0], AsyncScript):
                script, keys, args = write
                pipe.evalsha(script.sha, len(keys), *keys, *args)
            else:
                pipe.execute_command(*write)
        try:
            replies: list[Any] = await self.call(lambda: pipe.execute(raise_on_error=False))
        except RedisDown as exc:
            return [exc] * len(writes)
        for at, reply in enumerate(replies):
            if isinstance(reply, NoScriptError):
                replies[at] = await self._script(writes[at])
        return replies

    async def _script(self, write: Write) -> Any:
        """A script's reply, sent on its own (redis-py loads it if Redis has forgotten it), or
        the `RedisDown` that stopped it."""
        script, keys, args = write
        try:
            return await self.call(lambda: script(keys=keys, args=args))
        except RedisDown as exc:
            return exc

    async def wait_changed(self) -> None:
        """Return at the next change of `up` (for tests; bound it with a timeout)."""
        await self._changed.wait()

    def on_down(self, listener: Callable[[], None]) -> None:
        """Call `listener()` whenever the breaker opens."""
        self._down_listeners.append(listener)

    def _failed(self, exc: BaseException, *, at_once: bool = False) -> None:
        self.errors += 1
        self.failures += 1
        if (at_once or self.failures >= _BREAK_AFTER) and not self._open:
            self._set_open(True, repr(exc))
            for listener in self._down_listeners:
                listener()

    def _set_open(self, opened: bool, reason: str = "") -> None:
        self._open = opened
        if opened:
            log.warning("redis.down", reason=reason, edges=self.edges)
        else:
            log.info("redis.up", edges=self.edges)
        self._changed.set()
        self._changed = asyncio.Event()

    async def run(self) -> None:
        """The heartbeat and the breaker's probe, forever (`run_events` beside it)."""
        while True:
            await self._beat()
            still_cancelled()
            await asyncio.sleep(_PROBE_S if self._open else _HEARTBEAT_S)

    async def run_events(self) -> None:
        """The event subscription, forever."""
        await self._subscribe()

    async def _beat(self) -> None:
        ttl_ms = str(int(_EDGE_TTL_S * 1000))
        try:
            async with asyncio.timeout(max(self.timeout, 0.5)):
                count = await self._heartbeat(keys=[EDGES], args=[self.edge_id, ttl_ms])
        except (RedisError, OSError, TimeoutError) as exc:
            still_cancelled()
            self._failed(exc)
            return
        self.failures = 0
        self.edges = max(1, int(count))
        if self._open:
            self._set_open(False)
            await self._resync()

    async def _resync(self) -> None:
        for resync in self._resyncs:
            try:
                await resync()
            except RedisDown:
                return

    async def _subscribe(self) -> None:
        """Apply every event on the channel; resubscribe (and resync) after a failure."""
        while True:
            pubsub = self.client.pubsub(ignore_subscribe_messages=True)
            try:
                await pubsub.subscribe(CHANNEL)
                await self._resync()
                while True:
                    message = await pubsub.get_message(timeout=1.0)
                    if message is not None:
                        self._dispatch(message.get("data"))
            except (RedisError, OSError) as exc:
                still_cancelled()
                log.info("redis.events_lost", error=repr(exc))
            finally:
                await _bounded(pubsub.aclose())  # type: ignore[no-untyped-call]  # untyped
            still_cancelled()
            await asyncio.sleep(_RESUBSCRIBE_S)

    def _dispatch(self, data: Any) -> None:
        try:
            event = orjson.loads(data)
        except (orjson.JSONDecodeError, TypeError):
            return
        if not isinstance(event, dict) or event.get("from") == self.edge_id:
            return
        handler = self._handlers.get(str(event.get("kind")))
        if handler is not None:
            handler(event)


def _answer(reply: _Reply, result: Any, error: RedisDown | None) -> None:
    if not reply.done():  # else the request that asked is gone
        reply.set_result((result, error))


def default_edge_id(port: int) -> str:
    """This edge's name among the edges: its host name and HTTP port."""
    return f"{socket.gethostname()}:{port}"


@asynccontextmanager
async def open_link(
    url: str, password_file: Path | None, wait_s: float, edge_id: str
) -> AsyncIterator[RedisLink]:
    """A `RedisLink` to `url` (`redis://` or `rediss://` for TLS), the password read from
    `password_file` (never logged); closed on exit. Redis may be away at start: the edge
    serves on local state until it answers."""
    password = read_key_file(password_file, "BACKHAUL_EDGE_REDIS_PASSWORD_FILE")
    client = aioredis.Redis.from_url(
        url,
        password=password.get_secret_value() if password is not None else None,
        socket_timeout=max(wait_s, 0.5),
        socket_connect_timeout=max(wait_s, 0.5),
        health_check_interval=0,
        # A pooled connection that died with a Redis now back is tried once more on a new one
        # (each call is bounded by `call()`'s timeout all the same).
        retry=Retry(NoBackoff(), 1),
    )
    link = RedisLink(client, wait_s, edge_id)
    started = time.monotonic()
    await link._beat()
    log.info(
        "redis.link",
        url=_redacted(url),
        up=link.failures == 0,
        edges=link.edges,
        edge=edge_id,
        ms=round((time.monotonic() - started) * 1000, 1),
    )
    try:
        yield link
    finally:
        await _bounded(link.drain())
        await _bounded(client.aclose())


async def _bounded(closing: Awaitable[object]) -> None:
    """Close a Redis client or subscription, for at most a second, whatever it raises: a
    connection to a Redis that went away must not hold the edge's shutdown."""
    with contextlib.suppress(Exception):
        async with asyncio.timeout(1.0):
            await closing


def _redacted(url: str) -> str:
    """The URL without a password in it (`redis://:secret@host` is allowed by the scheme)."""
    scheme, sep, rest = url.partition("://")
    if "@" in rest:
        rest = "***@" + rest.rpartition("@")[2]
    return f"{scheme}{sep}{rest}"
