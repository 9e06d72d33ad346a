"""The GPU gate: bounded slots and queue, round-robin between keys, per-key limits, 503s."""

from __future__ import annotations

import asyncio
from pathlib import Path

import aiohttp
import pytest

from edge.errors import Overloaded
from edge.upstreams.gate import Gate, Slot
from tests.support.keyfiles import bearer, write_keys
from tests.support.refusals import assert_overloaded
from tests.support.servers import Edge, edge, simulator

GEN = {"model": "llama3.2:1b", "prompt": "hi", "stream": False}


def gate(max_inflight: int = 1, queue_max: int = 16, queue_timeout: float = 30.0) -> Gate:
    return Gate(max_inflight, queue_max, queue_timeout, retry_after=7)


class Caller:
    """A task that takes a slot, notes the order it got it in, and holds it until let go."""

    def __init__(self, g: Gate, group: asyncio.TaskGroup, name: str, key: str, order: list[str],
                 limit: int | None = None) -> None:  # fmt: skip
        self.name, self.go = name, asyncio.Event()
        self.slot: Slot | None = None
        self.error: Overloaded | None = None
        self.task = group.create_task(self._run(g, key, limit, order))

    async def _run(self, g: Gate, key: str, limit: int | None, order: list[str]) -> None:
        try:
            async with g.slot(key, limit) as slot:
                self.slot = slot
                order.append(self.name)
                await self.go.wait()
        except Overloaded as exc:
            self.error = exc


async def test_free_slots_are_taken_at_once_and_released():
    g = gate(max_inflight=2)
    async with g.slot("a") as one, g.slot("b") as two:
        assert one.queue_ms == 0.0 and two.queue_ms == 0.0
        assert g.inflight == 2 and g.queued == 0
        one.release()  # early, as a stream does when its upstream ends
        one.release()  # twice is harmless
        assert g.inflight == 1
    assert g.inflight == 0 and g.running("a") == 0


async def test_round_robin_between_keys():
    """A key that queued four requests does not make a later key wait behind all four."""
    g = gate()
    order: list[str] = []
    async with asyncio.timeout(10), asyncio.TaskGroup() as group:
        holder = Caller(g, group, "holder", "h", order)
        callers = []
        for i, (name, key) in enumerate(
            [("a1", "a"), ("a2", "a"), ("a3", "a"), ("a4", "a"), ("b1", "b"), ("b2", "b")]
        ):
            callers.append(Caller(g, group, name, key, order))
            await g.wait_queued(i + 1)
        for caller in [holder, *callers]:
            caller.go.set()  # each leaves as soon as it has its slot
    assert order == ["holder", "a1", "b1", "a2", "b2", "a3", "a4"]  # FIFO: a1-a4, then b1, b2
    assert all(c.slot is not None and c.slot.queue_ms > 0 for c in callers)
    assert g.inflight == 0 and g.queued == 0


async def test_per_key_limit_leaves_free_slots_to_other_keys():
    g = gate(max_inflight=2)
    order: list[str] = []
    async with asyncio.timeout(10), asyncio.TaskGroup() as group:
        a1 = Caller(g, group, "a1", "a", order, limit=1)
        await g.wait_inflight(1)
        a2 = Caller(g, group, "a2", "a", order, limit=1)
        await g.wait_queued(1)  # a slot is free, but key a is at its limit of 1
        assert g.inflight == 1 and g.running("a") == 1
        b1 = Caller(g, group, "b1", "b", order)
        await g.wait_inflight(2)
        assert order == ["a1", "b1"]
        assert b1.slot is not None and b1.slot.queue_ms == 0.0  # passed a2, which could not run
        b1.go.set()
        await g.wait_inflight(1)
        assert order == ["a1", "b1"] and g.queued == 1  # b's slot did not go to a2 either
        a1.go.set()
        await g.wait_queued(0)
        a2.go.set()
    assert order == ["a1", "b1", "a2"]
    assert a2.slot is not None and a2.slot.queue_ms > 0


async def test_full_queue_drops_the_flooders_newest_for_a_quiet_key():
    g = gate(queue_max=3)
    order: list[str] = []
    async with asyncio.timeout(10), asyncio.TaskGroup() as group:
        holder = Caller(g, group, "holder", "h", order)
        flood = []
        for i in range(3):
            flood.append(Caller(g, group, f"a{i + 1}", "a", order))
            await g.wait_queued(i + 1)
        # The queue is full. Another request from the flooder is refused at once...
        with pytest.raises(Overloaded) as refused:
            async with g.slot("a"):
                pass
        assert refused.value.headers["Retry-After"] == "7"
        # ... but a quiet key takes the place of the flooder's newest waiter.
        quiet = Caller(g, group, "b1", "b", order)
        await flood[2].task
        assert flood[2].error is not None and flood[2].slot is None
        assert "fewer requests waiting" in flood[2].error.message
        assert g.queued == 3
        # With a: 2 and b: 1 waiting, dropping a's newest for b would not be fairer.
        with pytest.raises(Overloaded):
            async with g.slot("b"):
                pass
        for caller in [holder, *flood, quiet]:
            caller.go.set()
    assert order == ["holder", "a1", "b1", "a2"]


async def test_no_queue_means_503_at_once():
    g = gate(max_inflight=2, queue_max=0)
    async with g.slot("a", limit=1):
        with pytest.raises(Overloaded, match="at its limit of 1 requests at once"):
            async with g.slot("a", limit=1):
                pass
        async with g.slot("b"):
            with pytest.raises(Overloaded, match=r"at capacity \(2 running, 0 queued\)"):
                async with g.slot("c"):
                    pass


async def test_wait_past_queue_timeout_is_overloaded():
    g = gate(queue_timeout=0.2)
    async with g.slot("a"):
        with pytest.raises(Overloaded, match=r"waited 0\.2 s") as exc:
            async with g.slot("b"):
                pass
        assert exc.value.headers == {"Retry-After": "7"}
        assert g.queued == 0
    assert g.inflight == 0


async def test_cancelled_waiter_passes_a_granted_slot_on():
    """A client that leaves just as its slot is granted must not take the slot with it."""
    g = gate()
    order: list[str] = []
    async with asyncio.timeout(10), asyncio.TaskGroup() as group:
        holder = Caller(g, group, "holder", "h", order)
        await g.wait_inflight(1)
        first = Caller(g, group, "first", "a", order)
        await g.wait_queued(1)
        second = Caller(g, group, "second", "b", order)
        await g.wait_queued(2)
        assert holder.slot is not None
        holder.slot.release()  # grants `first` ...
        first.task.cancel()  # ... which goes away before it ever runs
        await g.wait_queued(0)
        await g.wait_inflight(1)
        for caller in (holder, second):
            caller.go.set()
    assert order == ["holder", "second"]
    assert g.inflight == 0 and g.queued == 0


async def one_token(
    http: aiohttp.ClientSession, e: Edge, request_id: str, headers: dict[str, str]
) -> int:
    """A generate request for one token, sent with `headers`; its status, once answered whole."""
    body = {**GEN, "options": {"num_predict": 1}}
    async with http.post(
        f"{e.url}/api/generate", json=body, headers={"X-Request-Id": request_id, **headers}
    ) as r:
        await r.read()
        return r.status


async def queued_in_turn(
    group: asyncio.TaskGroup,
    http: aiohttp.ClientSession,
    e: Edge,
    request_ids: list[str],
    headers: dict[str, str],
) -> list[asyncio.Task[int]]:
    """`one_token()` requests in `group`, each sent once the one before it waits at the gate, so
    that they queue in this order."""
    gate = e.edge.pool.gate
    tasks = []
    for request_id in request_ids:
        tasks.append(group.create_task(one_token(http, e, request_id, headers)))
        await gate.wait_queued(gate.queued + 1)
    return tasks


async def test_anonymous_callers_share_slots_fairly_by_address(
    tmp_path: Path, http: aiohttp.ClientSession
):
    """Through the edge: one address floods the queue; another's request is served second."""
    async with (
        simulator(tok_per_s=20, reply_tokens=10_000) as sim,
        edge(sim.url, tmp_path, max_inflight=1, trusted_proxies=["127.0.0.1/32"]) as e,
    ):
        flooder, quiet_one = {"X-Forwarded-For": "203.0.113.1"}, {"X-Forwarded-For": "198.51.100.7"}
        async with asyncio.timeout(20):
            holder = {**GEN, "stream": True}  # 10,000 tokens at 20 tok/s: it holds the slot
            # From a trusted proxy every request names its client (else 400 unknown_client).
            via = {"X-Forwarded-For": "192.0.2.9"}
            async with http.post(f"{e.url}/api/generate", json=holder, headers=via) as r:
                assert r.status == 200
                await r.content.readline()
                async with asyncio.TaskGroup() as group:
                    flooding = [f"f{i}" for i in range(6)]
                    calls = await queued_in_turn(group, http, e, flooding, flooder)
                    calls += await queued_in_turn(group, http, e, ["q0"], quiet_one)
                    r.close()  # the holder leaves: its generation stops, its slot frees
        assert [c.result() for c in calls] == [200] * 7
        served = [
            seen.headers["X-Request-Id"]
            for seen in sim.stats.requests
            if seen.path == "/api/generate" and "X-Request-Id" in seen.headers
        ][1:]  # after the holder
        assert served == ["f0", "q0", "f1", "f2", "f3", "f4", "f5"]
        quiet, last = await e.record("q0"), await e.record("f5")
        assert quiet["client"] == "198.51.100.7" and quiet["status"] == 200
        assert 0 < quiet["queue_ms"] < last["queue_ms"]


async def test_api_keys_share_the_gate_within_their_own_limits(
    tmp_path: Path, http: aiohttp.ClientSession
):
    """A key at its max_concurrency waits; another key takes the slot left free meanwhile."""
    secrets = write_keys(tmp_path / "keys.json", flood={"max_concurrency": 1}, other={})
    async with (
        simulator(tok_per_s=20, reply_tokens=10_000, parallel=2) as sim,
        edge(sim.url, tmp_path, auth="keys", max_inflight=2) as e,
    ):
        g = e.edge.pool.gate
        flood, other = bearer(secrets["flood"]), bearer(secrets["other"])
        async with asyncio.timeout(20):
            holder = {**GEN, "stream": True}
            async with http.post(f"{e.url}/api/generate", json=holder, headers=flood) as held:
                await held.content.readline()
                async with asyncio.TaskGroup() as group:
                    floods = await queued_in_turn(group, http, e, ["f0", "f1", "f2"], flood)
                    assert g.inflight == 1  # a slot is free, but not for a key at its limit
                    assert await one_token(http, e, "o1", other) == 200  # the free slot, at once
                    assert g.running("key:flood") == 1 and g.queued == 3
                    held.close()  # the holder leaves; flood's waiters run one at a time
        assert [f.result() for f in floods] == [200, 200, 200]
        record = await e.record("o1")
        assert record["key"] == "other" and record["queue_ms"] == 0.0
        for i in range(3):
            record = await e.record(f"f{i}")
            assert record["key"] == "flood" and record["queue_ms"] > 0
        assert sim.stats.peak_generating <= 2


async def test_overloaded_through_the_edge_has_retry_after_and_telemetry(
    tmp_path: Path, http: aiohttp.ClientSession
):
    async with (
        simulator(tok_per_s=20, reply_tokens=10_000) as sim,
        edge(sim.url, tmp_path, max_inflight=1, queue_max=1, queue_timeout=0.3) as e,
    ):
        async with http.post(f"{e.url}/api/generate", json={**GEN, "stream": True}) as held:
            await held.content.readline()
            await assert_overloaded(http, e, "waited")  # queued, then the wait ran out
        record = await e.record("waited")
        assert record["status"] == 503 and record["type"] == "overloaded"
        assert record["outcome"] == "error" and record["queue_ms"] is None
        assert [s.path for s in sim.stats.requests].count("/v1/completions") == 0
