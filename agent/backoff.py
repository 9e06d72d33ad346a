"""Reconnect pacing: capped exponential backoff with full jitter, reset only after stability.

Full jitter (AWS Architecture Blog, "Exponential Backoff and Jitter"): the n-th retry waits a
uniform random time in [0, min(cap, initial * 2**n)]. Spreading every wait over its whole range
is what keeps a fleet of agents that lost the same VPS at the same moment from returning in step.
The sequence starts again only once a connection stayed up `stable_after` seconds, so a tunnel
that comes up and drops at once keeps backing off instead of hammering; the first retry after a
healthy session is still jittered over [0, initial]. Permanent failures wait at the cap, jittered
over its upper half, and never sooner.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass, field


@dataclass(slots=True)
class Backoff:
    """The delay before each reconnect attempt; `rng` returns floats in [0, 1)."""

    initial: float
    cap: float
    stable_after: float
    rng: Callable[[], float] = field(default=random.random)
    attempt: int = 0

    def next_delay(self) -> float:
        """The delay before the next attempt after a transient failure; advances the sequence."""
        ceiling = self.bound()
        self.attempt += 1
        return self.rng() * ceiling

    def at_cap(self) -> float:
        """The delay after a permanent failure: in [cap / 2, cap], never a quick retry."""
        self.attempt += 1
        return self.cap * (0.5 + 0.5 * self.rng())

    def session_ended(self, uptime: float) -> None:
        """Record how long a connection stayed up; a stable one restarts the sequence."""
        if uptime >= self.stable_after:
            self.attempt = 0

    def bound(self) -> float:
        """The longest the next transient delay can be (what tests and docs reason with)."""
        # Bound the exponent: 2**64 is past any cap and keeps the float finite.
        return min(self.cap, self.initial * 2.0 ** min(self.attempt, 64))
