"""The GPU gate: at most `max_inflight` upstream requests, a bounded queue, a maximum wait.

A GPU serves a couple of requests at a time well; more only slows every one of them and fills
Ollama's own queue, which then answers 503 after the caller has waited. The gate keeps the
waiting here, where it is bounded, measured (`queue_ms`) and answered early: a full queue or a
wait past `queue_timeout` is 503 `overloaded` with `Retry-After`.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from edge.errors import Overloaded


class Gate:
    """A counting semaphore with a bounded, timed queue, first come first served."""

    def __init__(
        self, max_inflight: int, queue_max: int, queue_timeout: float, retry_after: int
    ) -> None:
        self.max_inflight = max_inflight
        self.queue_max = queue_max
        self.queue_timeout = queue_timeout
        self._retry_after = str(retry_after)
        self._slots = asyncio.Semaphore(max_inflight)
        self.inflight = 0
        self.queued = 0

    @asynccontextmanager
    async def slot(self) -> AsyncIterator[float]:
        """Hold one upstream slot for the body of the `with`; yields the ms spent queued.

        Error handling: raises `Overloaded` when the queue is full or the wait times out.
        """
        start = time.perf_counter()
        if self._slots.locked():
            if self.queued >= self.queue_max:
                raise Overloaded(
                    f"the model server is at capacity ({self.max_inflight} running, "
                    f"{self.queued} queued); try again shortly",
                    headers={"Retry-After": self._retry_after},
                )
            self.queued += 1
            try:
                async with asyncio.timeout(self.queue_timeout):
                    await self._slots.acquire()
            except TimeoutError:
                raise Overloaded(
                    f"waited {self.queue_timeout:g} s for the model server; try again shortly",
                    headers={"Retry-After": self._retry_after},
                ) from None
            finally:
                self.queued -= 1
        else:
            await self._slots.acquire()
        self.inflight += 1
        try:
            yield (time.perf_counter() - start) * 1000.0
        finally:
            self.inflight -= 1
            self._slots.release()
