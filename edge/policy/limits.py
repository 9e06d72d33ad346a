"""Rate limits: token buckets per key, per feature caller and per client address, bounded.

A bucket holds up to `limit` tokens and refills at `limit` per minute, so a caller may burst up
to its limit and then goes at the limit's pace. A request takes one token before its body is
read (`rpm`); tokens per minute (`tpm`) are charged after the response, from the figures the
model server reported, so that bucket may go into debt: a request passes while one token is
left, and the key waits until it is out of debt.

Memory is bounded whatever an attacker does: each `Buckets` keeps at most `max_entries` entries,
least recently used first out. A full bucket carries no state (a new one would be the same), so
eviction looks for full ones among the oldest first and only then drops a bucket in use; under an
address spray the evicted addresses are the ones that stopped calling.

The clock is injected (monotonic seconds), so tests move time instead of sleeping.
"""

from __future__ import annotations

import math
import time
from collections import OrderedDict
from collections.abc import Callable, Hashable
from dataclasses import dataclass
from typing import Protocol

# How many of the oldest entries one insertion inspects for a full bucket before it evicts the
# oldest whatever its state: keeps insertion O(1) under a spray.
_EVICTION_SCAN = 8
# Float slack: a bucket refilled to 0.9999999 tokens after exactly 1/rate seconds has one.
_EPSILON = 1e-9


@dataclass(frozen=True, slots=True)
class Decision:
    """What a bucket said: allowed or not, and the figures for the `RateLimit-*` headers."""

    allowed: bool  # a one-token request would pass now
    limit: int
    remaining: int  # whole tokens left
    reset_s: int  # seconds until the bucket is full again
    retry_after_s: int  # seconds until a request would pass (0 when it would now)

    def headers(self) -> dict[str, str]:
        """IETF draft `RateLimit-*` names (draft-ietf-httpapi-ratelimit-headers), plus
        `Retry-After` when refused."""
        out = {
            "RateLimit-Limit": str(self.limit),
            "RateLimit-Remaining": str(self.remaining),
            "RateLimit-Reset": str(self.reset_s),
        }
        if not self.allowed:
            out["Retry-After"] = str(self.retry_after_s)
        return out


class _Bucket:
    __slots__ = ("level", "limit", "stamp")

    def __init__(self, limit: int, now: float) -> None:
        self.limit = limit
        self.level = float(limit)
        self.stamp = now

    def refill(self, limit: int, now: float) -> None:
        self.limit = limit  # the key's limit may have been edited: keep the debt, cap the credit
        rate = limit / 60.0
        self.level = min(float(limit), self.level + (now - self.stamp) * rate)
        self.stamp = now

    def full(self, now: float) -> bool:
        return self.level + (now - self.stamp) * self.limit / 60.0 >= self.limit - _EPSILON


class Buckets:
    """Token buckets by name (a key name, an address, a tuple), at most `max_entries` kept."""

    def __init__(self, max_entries: int, clock: Callable[[], float] = time.monotonic) -> None:
        self.max_entries = max_entries
        self.clock = clock
        self._buckets: OrderedDict[Hashable, _Bucket] = OrderedDict()

    def __len__(self) -> int:
        return len(self._buckets)

    def allows(self, name: Hashable, limit: int) -> bool:
        """Would a one-token request pass now? Takes nothing."""
        return self._bucket(name, limit, self.clock()).level >= 1.0 - _EPSILON

    def take(self, name: Hashable, limit: int) -> bool:
        """Take one token if there is one; whether it did."""
        bucket = self._bucket(name, limit, self.clock())
        if bucket.level < 1.0 - _EPSILON:
            return False
        bucket.level -= 1.0
        return True

    def headers(self, name: Hashable, limit: int) -> dict[str, str]:
        """`RateLimit-*` for a request just admitted: `decision(...).headers()`, made cheaply
        since every limited response carries them."""
        bucket = self._bucket(name, limit, self.clock())
        level = bucket.level
        return {
            "RateLimit-Limit": str(bucket.limit),
            "RateLimit-Remaining": str(max(0, math.floor(level + _EPSILON))),
            "RateLimit-Reset": str(
                max(0, math.ceil((bucket.limit - level) * 60.0 / bucket.limit - _EPSILON))
            ),
        }

    def decision(self, name: Hashable, limit: int) -> Decision:
        """The bucket's figures now, for the `RateLimit-*` headers (and `Retry-After`)."""
        bucket = self._bucket(name, limit, self.clock())
        rate = bucket.limit / 60.0
        level = bucket.level
        allowed = level >= 1.0 - _EPSILON
        return Decision(
            allowed=allowed,
            limit=bucket.limit,
            remaining=max(0, math.floor(level + _EPSILON)),
            reset_s=max(0, math.ceil((bucket.limit - level) / rate - _EPSILON)),
            retry_after_s=0 if allowed else max(1, math.ceil((1.0 - level) / rate - _EPSILON)),
        )

    def charge(self, name: Hashable, limit: int, cost: float) -> None:
        """Take `cost` tokens after the fact: the bucket may go into debt."""
        if cost <= 0:
            return
        bucket = self._bucket(name, limit, self.clock())
        bucket.level -= cost

    def _bucket(self, name: Hashable, limit: int, now: float) -> _Bucket:
        bucket = self._buckets.get(name)
        if bucket is None:
            if len(self._buckets) >= self.max_entries:
                self._evict(now)
            bucket = self._buckets[name] = _Bucket(limit, now)
        else:
            self._buckets.move_to_end(name)
            bucket.refill(limit, now)
        return bucket

    def _evict(self, now: float) -> None:
        for scanned, (name, bucket) in enumerate(self._buckets.items()):
            if bucket.full(now):
                del self._buckets[name]  # iteration stops here, so deleting is safe
                return
            if scanned + 1 >= _EVICTION_SCAN:
                break
        self._buckets.popitem(last=False)


@dataclass(frozen=True, slots=True)
class Check:
    """One limit a request is held to: `limit` a minute of `kind` for `name`, of which the
    request takes `cost` now (1 for a request; 0 for tokens, which are charged after the answer:
    then the check only asks that the subject is not over)."""

    kind: str  # "rpm", "tpm" or "caller" (a feature's per-caller requests per minute)
    name: str
    limit: int
    cost: int
    who: str  # for the message: "key 'ci'", "feature 'summary' from this address"


@dataclass(frozen=True, slots=True)
class Verdict:
    """What the limits said of a request's checks: each one's figures, and which refused it."""

    decisions: list[Decision]
    refused: int | None  # the index of the first check that refused, else None
    limiter: str  # "local" or "redis": who decided (the telemetry's `limiter`)


class LocalLimits:
    """The checks against this edge's own buckets, all or nothing: a refused request takes
    nothing. With a `share` below 1, each limit is that share of itself (a fallback while the
    edges' shared state is away: `edge.cluster.limits`)."""

    def __init__(self, max_entries: int, clock: Callable[[], float] = time.monotonic) -> None:
        self.buckets = {kind: Buckets(max_entries, clock) for kind in ("rpm", "tpm", "caller")}

    def take(self, checks: list[Check], share: float = 1.0, limiter: str = "local") -> Verdict:
        limits = [_share(check.limit, share) for check in checks]
        for i, (check, limit) in enumerate(zip(checks, limits, strict=True)):
            if not self.buckets[check.kind].allows(check.name, limit):
                return Verdict(self._decisions(checks, limits), i, limiter)
        for check, limit in zip(checks, limits, strict=True):
            if check.cost:
                self.buckets[check.kind].charge(check.name, limit, check.cost)
        return Verdict(self._decisions(checks, limits), None, limiter)

    def charge(self, check: Check, share: float = 1.0) -> None:
        self.buckets[check.kind].charge(check.name, _share(check.limit, share), check.cost)

    def _decisions(self, checks: list[Check], limits: list[int]) -> list[Decision]:
        return [
            self.buckets[check.kind].decision(check.name, limit)
            for check, limit in zip(checks, limits, strict=True)
        ]


class Limits(Protocol):
    """Who decides a request's limits: this edge alone, or the edges together."""

    async def take(self, checks: list[Check]) -> Verdict: ...

    async def charge(self, check: Check) -> None: ...


class AloneLimits:
    """One edge's limits: its own buckets, nothing to wait on."""

    def __init__(self, local: LocalLimits) -> None:
        self._local = local

    async def take(self, checks: list[Check]) -> Verdict:
        return self._local.take(checks)

    async def charge(self, check: Check) -> None:
        self._local.charge(check)


def _share(limit: int, share: float) -> int:
    return limit if share >= 1.0 else max(1, math.floor(limit * share))
