"""Rate limits several edges share: GCRA in Redis, one script call per request.

The same limits as one edge's buckets (`edge.policy.limits`: up to `limit` at once, refilled at
`limit` a minute; tokens charged after the answer, which may go into debt), kept as GCRA's one
number per (subject, limit): the theoretical arrival time (TAT). A request's checks are all
asked and taken in one script (`_TAKE`), on Redis's own clock (`TIME`: two VPS clocks apart do
not matter), so a key limited to 30 a minute gets 30 however many edges it is spread over.

When Redis is away (`RedisDown`: the call failed, took longer than `redis_timeout`, or the
breaker is open) the request is decided by this edge's own buckets, each limit cut to this
edge's share (`redis_local_share`, or 1 / the number of edges last seen): never wide open, never
a 500, never a wait past the timeout. Each decision says which limiter made it (`Verdict`).
Those buckets shadow the shared ones: every request Redis admits is charged to them too (in
memory, at the share), so a fallback goes on from what this edge has used, not from full
buckets: a breaker that opens mid-burst (a saturated loop misses the timeout) does not hand
every edge a fresh share on top of what Redis already counted.

Tokens are charged after the answer, off the request's path (the answer does not wait for
it), within `link.WRITE_BEHIND_S` (2 ms), in one round trip with the other writes behind requests
(`RedisLink.later`): about as soon as a call of its own would land, at a fraction of its CPU.
Batching them for longer would let a key's next requests through on every edge until the batch
went.
"""

from __future__ import annotations

import math
from typing import Any

from edge.cluster.link import NOW_MS, RedisDown, RedisLink
from edge.policy.limits import Check, Decision, LocalLimits, Verdict

_PERIOD_MS = 60_000.0
PREFIX = "bh:rl"

# KEYS: one per check. ARGV: the mode ("take": all checks must pass, then each takes its cost;
# "charge": each takes its cost), then per check its limit a minute and its cost.
# Returns the index of the refusing check (0: none), then per check its TAT - now in ms.
_TAKE = (
    NOW_MS
    + """
local period = 60000
local tats = {}
local refused = 0
for i = 1, #KEYS do
  local interval = period / tonumber(ARGV[2 * i])
  local tat = tonumber(redis.call('GET', KEYS[i])) or now
  if tat < now then tat = now end
  tats[i] = tat
  if ARGV[1] == 'take' and refused == 0 and tat + interval - now > period then refused = i end
end
local out = {refused}
for i = 1, #KEYS do
  local interval = period / tonumber(ARGV[2 * i])
  local cost = tonumber(ARGV[2 * i + 1])
  local tat = tats[i]
  if refused == 0 and cost > 0 then
    tat = tat + cost * interval
    redis.call('SET', KEYS[i], tostring(tat), 'PX', math.ceil(tat - now) + 1000)
  end
  out[#out + 1] = tostring(tat - now)
end
return out
"""
)


class SharedLimits:
    """The limits of every edge, in Redis; this edge's share of them while Redis is away."""

    def __init__(self, link: RedisLink, local: LocalLimits, share: float | None) -> None:
        self._link = link
        self._local = local
        self._share = share
        self._script = link.client.register_script(_TAKE)

    @property
    def share(self) -> float:
        """The part of each limit this edge allows on its own while Redis is away."""
        return self._share if self._share is not None else 1.0 / max(1, self._link.edges)

    async def take(self, checks: list[Check]) -> Verdict:
        try:
            reply = await self._run("take", checks)
        except RedisDown:
            return self._local.take(checks, self.share)
        refused = int(reply[0])
        decisions = [
            _decision(check, float(ahead)) for check, ahead in zip(checks, reply[1:], strict=True)
        ]
        if not refused:
            share = self.share
            for check in checks:
                if check.cost:
                    self._local.charge(check, share)  # the shadow (module doc)
        return Verdict(decisions, refused - 1 if refused else None, "redis")

    async def charge(self, check: Check) -> None:
        """Charge `check.cost` tokens: to the shadow now, to Redis with the other writes behind
        requests (`RedisLink.later`); while Redis is away the shadow is what counts."""
        self._local.charge(check, self.share)
        self._link.later((self._script, *_keys_and_args("charge", [check])))

    async def _run(self, mode: str, checks: list[Check]) -> list[Any]:
        keys, args = _keys_and_args(mode, checks)
        reply: list[Any] = await self._link.run_script(self._script, keys, args)
        return reply


def _keys_and_args(mode: str, checks: list[Check]) -> tuple[list[str], list[str | int]]:
    keys = [f"{PREFIX}:{check.kind}:{check.name}" for check in checks]
    args: list[str | int] = [mode]
    for check in checks:
        args += [check.limit, check.cost]
    return keys, args


def _decision(check: Check, ahead_ms: float) -> Decision:
    """A check's figures from its TAT (`ahead_ms` past now), as a bucket's would read."""
    interval = _PERIOD_MS / check.limit
    level = (_PERIOD_MS - ahead_ms) / interval  # whole tokens left, as a bucket counts them
    allowed = level >= 1.0 - 1e-9
    return Decision(
        allowed=allowed,
        limit=check.limit,
        remaining=max(0, math.floor(level + 1e-9)),
        reset_s=max(0, math.ceil(ahead_ms / 1000.0 - 1e-9)),
        retry_after_s=0
        if allowed
        else max(1, math.ceil((interval - (_PERIOD_MS - ahead_ms)) / 1000.0)),
    )
