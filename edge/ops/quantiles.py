"""Percentiles of a stream in bounded memory, for `backhaul-edge stats`.

`QuantileSketch` keeps the values themselves (a compact `array('d')`, 8 bytes each) while there
are at most `EXACT_LIMIT` of them, and answers exactly. Past that it moves to a log-bucketed
histogram (the DDSketch idea): a value v > 0 lands in bucket ceil(log(v) / log(gamma)) with
gamma = (1 + a) / (1 - a), and a bucket answers with the value that is within a relative error a
of everything in it. With a = 1 % and values between a microsecond and a few days in
milliseconds there are under 2,000 buckets, whatever the number of values, so memory is bounded
and a 1 GB log costs the same as a small one. Percentiles are nearest-rank: p50 of 1..100 is 50,
an observed value (or its bucket's value), never an interpolation between two.
"""

from __future__ import annotations

import math
from array import array
from collections import Counter
from collections.abc import Iterable
from itertools import repeat
from operator import mul

# Values kept exactly per sketch: 64 KiB of doubles, enough that the figures for a day of a small
# deployment (or any test) are exact, small enough that many groups x 4 sketches stay cheap.
EXACT_LIMIT = 8192
RELATIVE_ERROR = 0.01
_GAMMA = (1 + RELATIVE_ERROR) / (1 - RELATIVE_ERROR)
_INV_LOG_GAMMA = 1 / math.log(_GAMMA)
# At or below this a value counts as zero (a millisecond figure this small is rounding noise); it
# also keeps log() away from zero and negative values.
ZERO_BELOW = 1e-6
# The histogram's batch: values are bucketed a batch at a time by C-level map() over the array.
_BATCH = 1024


class QuantileSketch:
    """Exact percentiles for up to `EXACT_LIMIT` values, within `RELATIVE_ERROR` beyond."""

    __slots__ = ("_buckets", "_buffer", "_limit", "_spilled", "_zeros")

    def __init__(self) -> None:
        self._buffer = array("d")
        self._limit = EXACT_LIMIT
        self._buckets: Counter[int] | None = None
        self._spilled = 0
        self._zeros = 0

    def add(self, value: float) -> None:
        """Record one value (an `int` or `float`)."""
        self._buffer.append(value)
        if len(self._buffer) > self._limit:
            self._spill()

    @property
    def exact(self) -> bool:
        """Whether the percentiles are exact (every value is still kept)."""
        return self._buckets is None

    def __len__(self) -> int:
        return self._spilled + len(self._buffer)

    def quantiles(self, qs: Iterable[float]) -> list[float | None]:
        """The nearest-rank quantile for each q in 0..1; None for each when there are no values."""
        n = len(self)
        qs = list(qs)
        if n == 0:
            return [None for _ in qs]
        # The epsilon keeps 0.07 * 100 = 7.000000000000001 at rank 7.
        ranks = [min(n, max(1, math.ceil(q * n - 1e-9))) for q in qs]
        if self._buckets is None:
            ordered = sorted(self._buffer)
            return [ordered[rank - 1] for rank in ranks]
        self._spill()
        return [self._from_buckets(rank) for rank in ranks]

    def _from_buckets(self, rank: int) -> float:
        assert self._buckets is not None
        seen = self._zeros
        if rank <= seen:
            return 0.0
        for index in sorted(self._buckets):
            seen += self._buckets[index]
            if seen >= rank:
                # The bucket holds (gamma^(i-1), gamma^i]; this value is within a of both ends.
                return 2 * _GAMMA**index / (_GAMMA + 1)
        raise AssertionError("rank beyond the count")  # pragma: no cover - ranks are clamped

    def _spill(self) -> None:
        if self._buckets is None:
            self._buckets = Counter()
            self._limit = _BATCH
        values = self._buffer
        positive = array("d", filter(ZERO_BELOW.__lt__, values))
        self._zeros += len(values) - len(positive)
        # Counter.update over map() runs in C: ~0.1 us a value instead of a Python loop's ~0.5 us.
        self._buckets.update(
            map(math.ceil, map(mul, map(math.log, positive), repeat(_INV_LOG_GAMMA)))
        )
        self._spilled += len(values)
        self._buffer = array("d")
