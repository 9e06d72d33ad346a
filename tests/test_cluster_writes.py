"""The writes no request waits on (a lease going back, a tpm charge, their events): queued by
`RedisLink.later` and sent together, one pipeline a batch, to a real `redis-server`.

What must hold: every write arrives, in the order queued; writes queued within the window share
one round trip; a script Redis forgot (a restart, `SCRIPT FLUSH`) is loaded again rather than
the write lost; with Redis away the caller is told, never raised at; what is queued when the
edge stops is still sent.
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest
import redis.asyncio as aioredis

from edge.cluster.link import RedisLink, open_link
from tests.support.redis import RedisServer, redis_server, requires_redis

pytestmark = [requires_redis(), pytest.mark.redis]

ADD = "return redis.call('INCRBY', KEYS[1], ARGV[1])"


def count_pipelines(link: RedisLink) -> list[int]:
    """How many pipelines the link opens from now on (the real client's, counted)."""
    opened: list[int] = []
    real = link.client.pipeline

    def counted(*args: Any, **kwargs: Any) -> Any:
        opened.append(1)
        return real(*args, **kwargs)

    link.client.pipeline = counted  # type: ignore[method-assign]
    return opened


async def read(redis: RedisServer, *command: Any) -> Any:
    client = aioredis.Redis(host="127.0.0.1", port=redis.port, decode_responses=True)
    try:
        return await client.execute_command(*command)  # type: ignore[no-untyped-call]  # untyped upstream
    finally:
        await client.aclose()


async def test_writes_queued_together_arrive_in_order_in_one_round_trip(tmp_path: Path) -> None:
    async with (
        redis_server(tmp_path / "redis") as redis,
        open_link(redis.url, None, 0.5, "edge0") as link,
    ):
        opened = count_pipelines(link)
        add = link.client.register_script(ADD)
        sent = [link.later(("RPUSH", "order", str(i))) for i in range(5)]
        sent.append(link.later((add, ["tokens"], [7]), ("RPUSH", "order", "last")))
        async with asyncio.timeout(5):
            assert await asyncio.gather(*sent) == [True] * 6
        assert opened == [1]
        assert await read(redis, "LRANGE", "order", 0, -1) == ["0", "1", "2", "3", "4", "last"]
        assert await read(redis, "GET", "tokens") == "7"


async def test_a_script_redis_forgot_is_loaded_again(tmp_path: Path) -> None:
    async with (
        redis_server(tmp_path / "redis") as redis,
        open_link(redis.url, None, 0.5, "edge0") as link,
    ):
        add = link.client.register_script(ADD)
        assert await add(keys=["tokens"], args=[1]) == 1  # loaded
        await link.client.script_flush()  # as after a restart of Redis
        async with asyncio.timeout(5):
            assert await link.later((add, ["tokens"], [5]))
        assert await read(redis, "GET", "tokens") == "6"


async def test_with_redis_away_the_caller_is_told_and_nothing_raises(tmp_path: Path) -> None:
    async with redis_server(tmp_path / "redis") as redis:
        async with open_link(redis.url, None, 0.2, "edge0") as link:
            await redis.stop()
            async with asyncio.timeout(5):
                assert await link.later(("SET", "lost", "1")) is False
            assert link.errors >= 1
        await redis.start()
        assert await read(redis, "GET", "lost") is None


async def test_what_is_queued_when_the_edge_stops_is_still_sent(tmp_path: Path) -> None:
    async with redis_server(tmp_path / "redis") as redis:
        async with open_link(redis.url, None, 0.5, "edge0") as link:
            queued = link.later(("SET", "last-words", "sent"))
        assert queued.done() and queued.result() is True
        assert await read(redis, "GET", "last-words") == "sent"
