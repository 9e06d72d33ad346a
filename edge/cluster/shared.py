"""Bans and keys several edges share: every edge reads its own copy, Redis carries the changes.

Reads stay local (a request never waits on Redis for a ban or a key); changes travel:

- **Bans.** A ban made on one edge (`BanList.fail` reaching the threshold) is added to the
  `bh:bans` sorted set (scored by its end, epoch ms) and published; every other edge applies it
  to its own list (and its ban file) as the event arrives, well under the issue's 1 s. Failure
  counts stay per edge: a guesser spread over three edges needs the threshold on one of them,
  which the per-key and per-address limits already slow down.
- **Keys.** `backhaul-edge keys add/revoke` with `redis_url` set writes the key (never its
  secret: only its digest, as the keys file holds it) into the `bh:keys` hash and publishes;
  every edge reloads the hash and lays it over its own keys file by name. The last hash an edge
  saw is kept in memory and in `keys_shared_path`, so an edge that restarts while Redis is away
  still knows every key.

After a reconnect both reload everything (`resync`): events sent meanwhile are lost.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from pathlib import Path
from typing import Any, cast

import orjson
import structlog
from pydantic import ValidationError

from edge.cluster.link import RedisDown, RedisLink
from edge.policy.bans import BanList
from edge.policy.budgets import LocalBudgets, Period
from edge.policy.keys import ApiKey, KeyStore
from shared.atomic import replace_file
from shared.runtime import still_cancelled

log = structlog.get_logger(__name__)

BANS = "bh:bans"
KEYS = "bh:keys"


class SharedBans:
    """This edge's bans, told to the others and told by them."""

    def __init__(self, link: RedisLink, bans: BanList) -> None:
        self._link = link
        self._bans = bans
        self._outbox: asyncio.Queue[tuple[str, float]] = asyncio.Queue()
        bans.on_ban = self._banned_here
        link.on("ban", self._banned_elsewhere)
        link.on_resync(self.resync)

    def _banned_here(self, address: str, until: float) -> None:
        self._outbox.put_nowait((address, until))

    def _banned_elsewhere(self, event: dict[str, Any]) -> None:
        address, until = event.get("address"), event.get("until")
        if isinstance(address, str) and isinstance(until, int | float):
            self._bans.ban(address, float(until), quiet=True)
            log.info("bans.shared", client=address, until=until, by=event.get("from"))

    async def run(self) -> None:
        """Send this edge's bans as they are made; one that cannot be sent now goes at the next
        resync (every edge reloads the set), and is already in force here."""
        while True:
            address, until = await self._outbox.get()
            try:
                client = self._link.client
                await self._link.call(
                    lambda: client.zadd(BANS, {address: until * 1000.0})  # noqa: B023
                )
            except RedisDown:
                still_cancelled()
                continue
            await self._link.publish("ban", address=address, until=until)

    async def resync(self) -> None:
        """Every ban in force, from the shared set (and this edge's own, into it)."""
        client = self._link.client
        now_ms = time.time() * 1000.0
        await self._link.call(lambda: client.zremrangebyscore(BANS, "-inf", now_ms))
        rows = await self._link.call(
            lambda: client.zrangebyscore(BANS, now_ms, "+inf", withscores=True)
        )
        for member, score in cast(list[tuple[Any, float]], rows):
            address = member.decode() if isinstance(member, bytes) else str(member)
            self._bans.ban(address, float(score) / 1000.0, quiet=True)
        mine = {address: end * 1000.0 for address, end in self._bans.in_force()}
        if mine:
            await self._link.call(lambda: client.zadd(BANS, mine))


class SharedKeys:
    """The keys every edge honours, laid over this edge's keys file."""

    def __init__(self, link: RedisLink, keys: KeyStore, saved: Path | None) -> None:
        self._link = link
        self._keys = keys
        self._saved = saved
        link.on("keys", self._changed)
        link.on_resync(self.resync)
        self._reload = asyncio.Event()

    def load_saved(self) -> None:
        """At start: the shared keys this edge last saw, in case Redis is away now."""
        if self._saved is None or not self._saved.exists():
            return
        try:
            rows = orjson.loads(self._saved.read_bytes())
            self._keys.share([ApiKey.model_validate(row) for row in rows])
        except (OSError, orjson.JSONDecodeError, ValidationError, TypeError) as exc:
            log.error("keys.shared_unreadable", path=str(self._saved), error=str(exc))

    def _changed(self, event: dict[str, Any]) -> None:
        self._reload.set()

    async def run(self) -> None:
        """Reload the shared keys whenever another edge (or the CLI) says they changed."""
        while True:
            await self._reload.wait()
            self._reload.clear()
            with contextlib.suppress(RedisDown):  # else the link's next resync loads them
                await self.resync()
            still_cancelled()

    async def resync(self) -> None:
        client = self._link.client
        rows = await self._link.call(lambda: client.hgetall(KEYS))
        keys = []
        for name, raw in rows.items():
            try:
                keys.append(ApiKey.model_validate_json(raw))
            except ValidationError as exc:
                log.error("keys.shared_refused", key=_text(name), error=str(exc))
        self._keys.share(keys)
        log.info("keys.shared", keys=len(keys))
        if self._saved is not None:
            data = orjson.dumps([key.model_dump(mode="json") for key in keys])
            await asyncio.to_thread(replace_file, self._saved, data)


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


BUDGET_PREFIX = "bh:budget"
_BUDGET_SYNC_S = 0.5


class SharedBudgets:
    """Token budgets counted over every edge: one Redis counter per key and period.

    The guard asks synchronously (`BudgetStore`), so this edge answers from its last view of
    each counter plus what it charged since; twice a second (`_BUDGET_SYNC_S`) it adds its
    charges to the counters and reads them back. Across edges a budget is so exact to within
    what the edges charge in half a second, on top of the overshoot one edge already allows
    (an answer admitted under the budget is served whole). The local store keeps being charged
    too: it is what a restart while Redis is away starts from.
    """

    def __init__(self, link: RedisLink, local: LocalBudgets) -> None:
        self._link = link
        self._local = local
        self._pending: dict[tuple[str, Period], int] = {}
        self._seen: dict[tuple[str, Period], int] = {}

    def spent(self, key_name: str, period: Period) -> int:
        at = (key_name, period)
        if at not in self._seen:
            self._seen[at] = self._local.spent(key_name, period)  # until Redis says more
        return self._seen[at] + self._pending.get(at, 0)

    def charge(self, key_name: str, period: Period, tokens: int) -> None:
        if tokens <= 0:
            return
        self._local.charge(key_name, period, tokens)
        at = (key_name, period)
        self._pending[at] = self._pending.get(at, 0) + tokens

    async def run(self) -> None:
        while True:
            with contextlib.suppress(RedisDown):
                await self.sync()
            still_cancelled()
            await asyncio.sleep(_BUDGET_SYNC_S)

    async def sync(self) -> None:
        """Add this edge's charges to the shared counters; read every counter it watches."""
        watched = [at for at in self._seen if at[1].end.timestamp() > time.time()]
        for at in [at for at in self._seen if at not in watched]:
            del self._seen[at]
        pending, self._pending = self._pending, {}
        client = self._link.client

        async def exchange() -> list[Any]:
            pipe = client.pipeline(transaction=False)
            for (name, period), tokens in pending.items():
                key = f"{BUDGET_PREFIX}:{name}:{period.label}"
                pipe.incrby(key, tokens)
                pipe.expireat(key, int(period.end.timestamp()) + 86_400)
            for name, period in watched:
                pipe.get(f"{BUDGET_PREFIX}:{name}:{period.label}")
            result: list[Any] = await pipe.execute()
            return result

        try:
            results = await self._link.call(exchange)
        except RedisDown:
            for at, tokens in pending.items():  # sent next time
                self._pending[at] = self._pending.get(at, 0) + tokens
            raise
        for at, value in zip(watched, results[2 * len(pending) :], strict=True):
            self._seen[at] = int(value or 0)
