"""Rate limits: token buckets per key, per feature caller and per client address, bounded.

A bucket holds up to `limit` tokens and refills at `limit` per minute, so a caller may burst up
to its limit and then goes at the limit's pace. Requests take one token before the body is read
(`rpm`); tokens per minute (`tpm`) are charged after the response, from the figures the model
server reported, so a bucket may go into debt and the key waits until it is out of it.

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

# How many of the oldest entries one insertion inspects for a full bucket before it evicts the
# oldest whatever its state: keeps insertion O(1) under a spray.
_EVICTION_SCAN = 8
# Float slack: a bucket refilled to 0.9999999 tokens after exactly 1/rate seconds has one.
_EPSILON = 1e-9


@dataclass(frozen=True, slots=True)
class Decision:
    """What a bucket said: allowed or not, and the figures for the `RateLimit-*` headers."""

    allowed: bool
    limit: int
    remaining: int  # whole tokens left after this request
    reset_s: int  # seconds until the bucket is full again
    retry_after_s: int  # seconds until the request would be allowed (0 when it is)

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

    def check(self, name: Hashable, limit: int, need: float = 1.0) -> Decision:
        """Would a request needing `need` tokens pass now? Takes nothing."""
        now = self.clock()
        bucket = self._bucket(name, limit, now)
        return self._decide(bucket, need)

    def take(self, name: Hashable, limit: int, cost: float = 1.0) -> Decision:
        """Take `cost` tokens if there are that many; the decision says whether it did."""
        now = self.clock()
        bucket = self._bucket(name, limit, now)
        decision = self._decide(bucket, cost)
        if decision.allowed:
            bucket.level -= cost
            decision = self._decide(bucket, 0.0)
        return decision

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

    @staticmethod
    def _decide(bucket: _Bucket, need: float) -> Decision:
        rate = bucket.limit / 60.0
        level = bucket.level
        allowed = level >= need - _EPSILON
        after = level - need if allowed else level
        return Decision(
            allowed=allowed,
            limit=bucket.limit,
            remaining=max(0, math.floor(after + _EPSILON)),
            reset_s=max(0, math.ceil((bucket.limit - after) / rate - _EPSILON)),
            retry_after_s=0 if allowed else max(1, math.ceil((need - level) / rate - _EPSILON)),
        )
