"""Fewer round trips to a real `redis-server`: the scripts requests wait on, asked for in one
turn of the event loop, share a pipeline (`RedisLink.run_script`); the writes no request waits
on (a lease going back, a tpm charge, their events) are queued by `RedisLink.later` and sent
together.

What must hold: each caller gets its own script's reply; every write arrives, in the order
queued; writes queued within the window share one round trip; a script Redis forgot (a restart,
`SCRIPT FLUSH`) is loaded again rather than the call or write lost; with Redis away the caller
is told (`RedisDown`, or `False` for a write), and nothing else raises; what is queued when the
edge stops is still sent.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest
import redis.asyncio as aioredis

from edge.cluster.link import RedisDown, RedisLink, open_link
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


@asynccontextmanager
async def linked(
    tmp_path: Path, redis_timeout: float = 0.5
) -> AsyncIterator[tuple[RedisServer, RedisLink]]:
    """A real redis-server, and an edge's link to it."""
    async with (
        redis_server(tmp_path / "redis") as redis,
        open_link(redis.url, None, redis_timeout, "edge0") as link,
    ):
        yield redis, link


async def read(redis: RedisServer, *command: Any) -> Any:
    client = aioredis.Redis(host="127.0.0.1", port=redis.port, decode_responses=True)
    try:
        return await client.execute_command(*command)  # type: ignore[no-untyped-call]  # untyped upstream
    finally:
        await client.aclose()


async def test_scripts_asked_together_share_a_pipeline_and_each_gets_its_reply(
    tmp_path: Path,
) -> None:
    async with linked(tmp_path) as (_, link):
        add = link.client.register_script(ADD)
        opened = count_pipelines(link)
        assert await link.run_script(add, ["alone"], [2]) == 2  # one: a call of its own
        assert opened == []
        async with asyncio.timeout(5):
            replies = await asyncio.gather(
                *(link.run_script(add, [f"k{i % 2}"], [i]) for i in range(1, 7))
            )
        assert opened == [1]
        assert replies == [1, 2, 4, 6, 9, 12]  # k1: 1, 1+3, 1+3+5; k0: 2, 2+4, 2+4+6
        await link.client.script_flush()  # as after a restart of Redis: loaded again
        async with asyncio.timeout(5):
            again = await asyncio.gather(
                link.run_script(add, ["k0"], [1]), link.run_script(add, ["k1"], [1])
            )
        assert list(again) == [13, 10]


async def test_a_script_asked_for_with_redis_away_is_redis_down(tmp_path: Path) -> None:
    async with linked(tmp_path, 0.2) as (redis, link):
        add = link.client.register_script(ADD)
        await redis.stop()
        for _ in range(2):  # alone, then two together
            with pytest.raises(RedisDown):
                async with asyncio.timeout(5):
                    await link.run_script(add, ["k"], [1])
        results = await asyncio.gather(
            link.run_script(add, ["k"], [1]),
            link.run_script(add, ["k"], [1]),
            return_exceptions=True,
        )
        assert all(isinstance(result, RedisDown) for result in results)


async def test_writes_queued_together_arrive_in_order_in_one_round_trip(tmp_path: Path) -> None:
    async with linked(tmp_path) as (redis, link):
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
    async with linked(tmp_path) as (redis, link):
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


async def test_a_script_whose_asker_went_away_before_it_was_sent_is_not_run(
    tmp_path: Path,
) -> None:
    """A lease taken for a request already gone would be a slot nobody holds until it expires."""
    async with linked(tmp_path) as (redis, link):
        add = link.client.register_script(ADD)
        # The loop runs callbacks in the order they were scheduled: `gone`'s first step (it
        # asks), then its cancellation, then the batch, which `stayed` below scheduled when it
        # asked first. So `gone` is cancelled after asking and before its batch leaves.
        gone = asyncio.create_task(link.run_script(add, ["gone"], [1]))
        asyncio.get_running_loop().call_soon(gone.cancel)
        stayed = await link.run_script(add, ["stayed"], [1])
        assert stayed == 1 and gone.cancelled()
        assert await read(redis, "GET", "gone") is None
