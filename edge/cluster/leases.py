"""The GPU gate across edges: each agent's slots as leases in Redis that expire.

Two edges in front of one GPU each have a gate of `max_inflight`; without this, together they
would admit twice that. So a request that has a slot in its own edge's gate (`edge.upstreams.
gate`) also takes one of the agent's leases: a member of the sorted set `bh:lease:<agent>`,
scored by its expiry on Redis's clock, taken by a script only while fewer than the agent's
capacity are live. The edge renews its leases every `RENEW_S` while they are held and removes
each when its request's upstream ends; a crashed edge's leases simply expire (`TTL_S`), so the
slots it held come back within that bound.

Each edge also keeps, per agent, how many leases the other edges hold (`Agent.elsewhere`, read
by every renewal and lowered by the `released` events): its own gate counts them as taken, so a
request waits in this edge's fair queue rather than asking Redis in a loop.

Redis away: the leases already held are kept (the renewal waits for Redis); new requests are
not leased, and each edge gates alone, up to each agent's `max_inflight`: the others' count is
forgotten, since the events that would lower it are lost meanwhile and a stale count would stall
this edge's queue until Redis is back. Together the edges may then admit more than an agent's
slots (the model server queues the rest) for as long as Redis is away.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
from typing import Any

import structlog

from edge.cluster.link import NOW_MS, RedisDown, RedisLink
from edge.upstreams.agent import Agent
from edge.upstreams.pool import Pool
from shared.runtime import still_cancelled

log = structlog.get_logger(__name__)

PREFIX = "bh:lease"
TTL_S = 10.0
RENEW_S = 2.0
# Longest a refused request waits for this edge's own leases on their way back.
_RETURN_WAIT_S = 0.1

# KEYS[1]: the agent's lease set. ARGV: the lease id, the capacity, the TTL in ms.
# Returns 1 when the lease was taken, else minus the number of live leases.
_ACQUIRE = (
    NOW_MS
    + """
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
local live = redis.call('ZCARD', KEYS[1])
if live >= tonumber(ARGV[2]) then return -live end
redis.call('ZADD', KEYS[1], now + tonumber(ARGV[3]), ARGV[1])
redis.call('PEXPIRE', KEYS[1], tonumber(ARGV[3]) * 2)
return 1
"""
)
# KEYS: lease sets. ARGV: the TTL in ms, then per key the number of its members that follow,
# then the members (this edge's leases). Renews them; returns per key the live members.
_RENEW = (
    NOW_MS
    + """
local ttl = tonumber(ARGV[1])
local at = 2
local out = {}
for i = 1, #KEYS do
  redis.call('ZREMRANGEBYSCORE', KEYS[i], '-inf', now)
  local n = tonumber(ARGV[at])
  for j = 1, n do
    redis.call('ZADD', KEYS[i], 'XX', now + ttl, ARGV[at + j])
  end
  at = at + n + 1
  redis.call('PEXPIRE', KEYS[i], ttl * 2)
  out[i] = redis.call('ZCARD', KEYS[i])
end
return out
"""
)


class SharedLeases:
    """This edge's leases on every agent's slots."""

    def __init__(self, link: RedisLink, pool: Pool) -> None:
        self._link = link
        self._pool = pool
        self._acquire = link.client.register_script(_ACQUIRE)
        self._renew = link.client.register_script(_RENEW)
        self._held: dict[str, set[str]] = {}  # agent -> this edge's lease ids
        self._ids = itertools.count()
        self._releasing: dict[asyncio.Future[bool], str] = {}  # leases going back, by agent
        link.on("released", self._released_elsewhere)
        link.on_down(self._alone)

    async def take(self, agent: Agent) -> str | None:
        """A lease on one of `agent`'s slots: its id; `""` when Redis is away (the request goes
        by this edge's own gate); None when the other edges hold the rest of its slots.

        Asked on every request, even by an edge that counted no other: a new edge's leases
        are not seen by the others until their next renewal, and a skipped lease there
        admitted one request too many (test_cluster's killed-edge test caught it)."""
        lease = f"{self._link.edge_id}:{next(self._ids)}"
        key = f"{PREFIX}:{agent.name}"
        args: list[str | int] = [lease, agent.capacity, int(TTL_S * 1000)]
        try:
            taken = await self._link.run_script(self._acquire, [key], args)
        except RedisDown:
            return ""
        if int(taken) <= 0:
            live, returning = -int(taken), self._returning_for(agent.name)
            if returning:
                # Some of those are this edge's own on their way back: let them land first.
                await asyncio.wait(returning, timeout=_RETURN_WAIT_S)
            # Counted as the others' until the next renewal: this edge's gate waits for them.
            agent.elsewhere = max(0, live - len(self._held.get(agent.name, ())) - len(returning))
            return None
        self._held.setdefault(agent.name, set()).add(lease)
        return lease

    def give_back(self, agent: Agent, lease: str) -> None:
        """The request's upstream ended: its lease goes back, off the request's path."""
        if not lease:
            return
        self._held.get(agent.name, set()).discard(lease)
        # Others wait for it only when the agent was full: else the renewal's count will do.
        # Not sent at once: with the other writes behind requests (`RedisLink.later`). If it
        # does not reach Redis, it expires.
        writes: list[tuple[Any, ...]] = [("ZREM", f"{PREFIX}:{agent.name}", lease)]
        if agent.inflight + agent.elsewhere + 1 >= agent.capacity:
            writes.append(self._link.event("released", agent=agent.name))
        returned = self._link.later(*writes)
        self._releasing[returned] = agent.name
        returned.add_done_callback(self._releasing.pop)

    def _returning_for(self, name: str) -> set[asyncio.Future[bool]]:
        return {done for done, agent in self._releasing.items() if agent == name}

    def _alone(self) -> None:
        for agent in self._pool.agents.values():
            agent.elsewhere = 0
        self._pool.changed()

    def _released_elsewhere(self, event: dict[str, Any]) -> None:
        agent = self._pool.agents.get(str(event.get("agent")))
        if agent is not None and agent.elsewhere > 0:
            agent.elsewhere -= 1
            self._pool.changed()

    async def run(self) -> None:
        """Renew this edge's leases and count the others', every `RENEW_S`, forever."""
        while True:
            with contextlib.suppress(RedisDown):
                await self.renew()
            still_cancelled()
            await asyncio.sleep(RENEW_S)

    async def renew(self) -> None:
        agents = list(self._pool.agents.values())
        if not agents:
            return
        keys = [f"{PREFIX}:{agent.name}" for agent in agents]
        args: list[str | int] = [int(TTL_S * 1000)]
        mine = []
        for agent in agents:
            held = list(self._held.get(agent.name, ()))
            mine.append(len(held))
            args += [len(held), *held]
        live = await self._link.call(lambda: self._renew(keys=keys, args=args))
        changed = False
        for agent, count, own in zip(agents, live, mine, strict=True):
            elsewhere = max(0, int(count) - own)
            if elsewhere != agent.elsewhere:
                agent.elsewhere, changed = elsewhere, True
        if changed:
            self._pool.changed()
