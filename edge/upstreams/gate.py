"""The GPU gate: at most `max_inflight` upstream requests, a bounded fair queue, a maximum wait.

A GPU serves a couple of requests at a time well; more only slows every one of them and fills
Ollama's own queue, which then answers 503 after the caller has waited. The gate keeps the
waiting here, where it is bounded, measured (`queue_ms`) and answered early: a full queue or a
wait past `queue_timeout` is 503 `overloaded` with `Retry-After`.

Why it is shaped like this. First come, first served lets one caller who sends 60 requests at
once make everyone else wait behind all 60. So waiters queue per key (an API key's name, or
the client address for anonymous callers) and a freed slot goes round-robin over the keys that
have waiters: a key that was just served goes to the back of the ring. A key may also have its
own concurrency limit (`max_concurrency` on an API key); its waiters are skipped while it is at
that limit, and other keys' waiters take the free slot. When the queue is full, a newcomer does
not simply bounce off a queue one key has filled: the key with the most waiters loses its newest
waiter instead (longest-queue drop), as long as that leaves it with at least as many as the
newcomer's key. So a flood costs the flooder, and a quiet key always gets a place in the queue.

The slot a caller holds is a `Slot` whose `release()` may come before its `with` block ends: a
streamed answer releases the slot when the upstream finishes, while the edge is still writing
the buffered rest to a slow client (`edge.proxy.handler`). Releasing twice is harmless.

One queue for a pool of GPUs. The slots are `Seat`s, one per agent (its `max_inflight`); the
queue is the pool's, so fairness between keys holds across the pool. Each caller brings a
`pick` that chooses a seat with a free slot among the agents that can serve it (the router's
order: `edge.upstreams.pool`), or None; a freed slot goes to the first waiter in the ring whose
pick finds a seat. A gate of one seat is the single-GPU gate it was before the pool.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field

from edge.errors import Overloaded


class Seat:
    """One upstream's slots: `capacity` requests at once (its `max_inflight`), of which other
    edges hold `elsewhere` (edges that share their gate: `edge.cluster.leases`)."""

    __slots__ = ("capacity", "elsewhere", "inflight")

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self.inflight = 0
        self.elsewhere = 0

    @property
    def free(self) -> bool:
        return self.inflight + self.elsewhere < self.capacity


# Chooses a seat with a free slot for one caller, or None when none of its seats has one.
Pick = Callable[[], Seat | None]


@dataclass(eq=False, slots=True)
class _Waiter:
    key: str
    limit: int | None
    pick: Pick
    # The seat granted (already counted as running), or None: dropped from a full queue.
    decided: asyncio.Future[Seat | None] = field(
        default_factory=lambda: asyncio.get_running_loop().create_future()
    )


class Slot:
    """One granted upstream slot; `release()` is idempotent and may precede the `with` exit."""

    __slots__ = ("_gate", "_released", "key", "queue_ms", "seat")

    def __init__(self, gate: Gate, key: str, seat: Seat, queue_ms: float) -> None:
        self._gate = gate
        self._released = False
        self.key = key
        self.seat = seat  # whose slot it is
        self.queue_ms = queue_ms  # 0.0 when the slot was free on arrival

    @property
    def released(self) -> bool:
        return self._released

    def release(self) -> None:
        if not self._released:
            self._released = True
            self._gate._release(self.key, self.seat)


class Gate:
    """Slots on one or more seats, with a bounded, timed queue, round-robin between keys.

    `max_inflight` is the capacity of the gate's own seat (`seat`), which `slot()` uses when
    given no `pick`: the single-GPU gate.
    """

    def __init__(
        self, max_inflight: int, queue_max: int, queue_timeout: float, retry_after: int
    ) -> None:
        self.seat = Seat(max_inflight)
        self.queue_max = queue_max
        self.queue_timeout = queue_timeout
        self._retry_after = str(retry_after)
        self.inflight = 0
        self.queued = 0
        self._running: dict[str, int] = {}  # key -> slots held
        # key -> its waiters, oldest first. Insertion order is the round-robin ring: a key
        # that was served is re-inserted at the end.
        self._waiting: dict[str, deque[_Waiter]] = {}
        self._changed = asyncio.Event()
        self._watchers = 0  # callers of wait_*: only they need an event on every change

    @property
    def max_inflight(self) -> int:
        """The gate's own seat's capacity."""
        return self.seat.capacity

    def _own_seat(self) -> Seat | None:
        return self.seat if self.seat.free else None

    @asynccontextmanager
    async def slot(
        self,
        key: str = "",
        limit: int | None = None,
        pick: Pick | None = None,
        wait: float | None = None,
    ) -> AsyncIterator[Slot]:
        """Hold one upstream slot for the `with` block (or until `Slot.release()`).

        `key` groups a caller's requests for fairness; `limit` is that key's own concurrency
        limit (None: only the gate's); `pick` chooses the seat (None: the gate's own); `wait`
        a shorter longest wait than `queue_timeout` (a request with somewhere else to go).

        Error handling: raises `Overloaded` when the queue is full (and nobody else's waiter
        can be dropped instead), when this waiter was dropped for a quieter key, or when the
        wait passes `queue_timeout`.
        """
        slot = await self.acquire(key, limit, pick or self._own_seat, wait)
        try:
            yield slot
        finally:
            slot.release()

    def running(self, key: str) -> int:
        """Slots `key` holds now."""
        return self._running.get(key, 0)

    async def wait_queued(self, n: int) -> None:
        """Return once `n` or more requests wait. Unbounded: callers add a timeout."""
        self._watchers += 1
        try:
            while self.queued < n:
                await self._changed.wait()
        finally:
            self._watchers -= 1

    async def wait_inflight(self, n: int) -> None:
        """Return once exactly `n` slots are held. Unbounded: callers add a timeout."""
        self._watchers += 1
        try:
            while self.inflight != n:
                await self._changed.wait()
        finally:
            self._watchers -= 1

    def _notify(self) -> None:
        # Wake every waiter of wait_*, then arm a fresh event for the next change; with none
        # (serving, as against a test or a drain watching), a request pays nothing for it.
        if self._watchers:
            self._changed.set()
            self._changed = asyncio.Event()

    def wake(self) -> None:
        """A seat may have room it did not have (an agent came back, or was added): give it
        to the waiters that can take it."""
        self._wake()

    async def acquire(
        self, key: str, limit: int | None, pick: Pick, wait: float | None = None
    ) -> Slot:
        """A slot on the seat `pick` chooses, now or after waiting; release it with
        `Slot.release()`. Errors as `slot()`."""
        if self._under_limit(key, limit):
            seat = pick()
            if seat is not None:
                # Nobody waiting can be passed over here: after every release the free slots
                # went to every waiter that could take one, so those left are at their key's
                # limit or wait for other seats.
                self._start(key, seat)
                return Slot(self, key, seat, 0.0)
        start = time.perf_counter()
        waiter = self._enqueue(key, limit, pick)
        longest = self.queue_timeout if wait is None else min(wait, self.queue_timeout)
        try:
            async with asyncio.timeout(longest):
                # Shielded: a timeout or a cancel must not cancel the decision itself, which
                # `_wake` may be setting at that very moment.
                granted = await asyncio.shield(waiter.decided)
        except TimeoutError:
            granted = waiter.decided.result() if waiter.decided.done() else None
            if granted is None:
                self._forget(waiter)
                raise Overloaded(
                    f"waited {longest:g} s for the model server; try again shortly",
                    headers={"Retry-After": self._retry_after},
                ) from None
            # the slot came as the wait ran out: take it
        except BaseException:
            # Cancelled (the client went away): a slot granted meanwhile goes to the next.
            seat = waiter.decided.result() if waiter.decided.done() else None
            if seat is not None:
                self._release(key, seat)
            else:
                self._forget(waiter)
            raise
        if granted is None:
            raise Overloaded(
                "the model server's queue is full and other callers have fewer requests "
                "waiting; try again shortly",
                headers={"Retry-After": self._retry_after},
            )
        return Slot(self, key, granted, (time.perf_counter() - start) * 1000.0)

    def _under_limit(self, key: str, limit: int | None) -> bool:
        return limit is None or self._running.get(key, 0) < limit

    def _start(self, key: str, seat: Seat) -> None:
        seat.inflight += 1
        self.inflight += 1
        self._running[key] = self._running.get(key, 0) + 1
        self._notify()

    def _release(self, key: str, seat: Seat) -> None:
        seat.inflight -= 1
        self.inflight -= 1
        left = self._running[key] - 1
        if left:
            self._running[key] = left
        else:
            del self._running[key]
        self._wake()
        self._notify()

    def _enqueue(self, key: str, limit: int | None, pick: Pick) -> _Waiter:
        if self.queued >= self.queue_max:
            self._drop_for(key, at_limit=not self._under_limit(key, limit))
        waiter = _Waiter(key, limit, pick)
        self._waiting.setdefault(key, deque()).append(waiter)
        self.queued += 1
        self._notify()
        return waiter

    def _drop_for(self, key: str, *, at_limit: bool) -> None:
        """Make room for `key` by dropping the newest waiter of the longest other queue."""
        mine = len(self._waiting.get(key, ()))
        longest = max(self._waiting.values(), key=len, default=None)
        if longest is None or len(longest) <= mine + 1:
            if at_limit:  # the slots may be free, not for this key
                message = (
                    f"this caller is at its limit of {self.running(key)} requests at once "
                    "and the queue is full; try again shortly"
                )
            else:
                message = (
                    f"the model server is at capacity ({self.inflight} running, "
                    f"{self.queued} queued); try again shortly"
                )
            raise Overloaded(message, headers={"Retry-After": self._retry_after})
        victim = longest.pop()  # never empties it: it is longer than mine + 1 >= 1
        self.queued -= 1
        victim.decided.set_result(None)

    def _forget(self, waiter: _Waiter) -> None:
        queue = self._waiting.get(waiter.key)
        if queue is None or waiter not in queue:
            return
        queue.remove(waiter)
        if not queue:
            del self._waiting[waiter.key]
        self.queued -= 1
        self._notify()

    def _wake(self) -> None:
        while self.queued:
            found = self._next_waiter()
            if found is None:
                return
            waiter, seat = found
            self._start(waiter.key, seat)
            waiter.decided.set_result(seat)

    def _next_waiter(self) -> tuple[_Waiter, Seat] | None:
        """In ring order, the first key under its limit with a waiter that has a free seat,
        and its oldest such waiter (with one seat, always the key's oldest)."""
        for key, queue in self._waiting.items():
            if not self._under_limit(key, queue[0].limit):
                continue
            for waiter in queue:
                seat = waiter.pick()
                if seat is None:
                    continue
                queue.remove(waiter)
                self.queued -= 1
                del self._waiting[key]
                if queue:
                    self._waiting[key] = queue  # served: to the back of the ring
                return waiter, seat
        return None
