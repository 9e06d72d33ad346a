"""A built-in fail2ban: addresses that keep failing authentication are refused for a while.

`threshold` failed authentications from one address within `window` seconds ban it for `period`
seconds: every request from it is answered 403 `banned` (with `Retry-After`) before anything
else is looked at, so it never reaches the model server. A failure is a key that was presented
and did not authenticate (wrong, malformed, revoked, expired; a wrong metrics token too): a
request without any key is refused 401 but is not a guess, and is not counted.

An "address" here is `edge.exchange.address_group`'s: one spelling per address (`2001:DB8::1` is
`2001:db8::1`, `::ffff:203.0.113.9` is `203.0.113.9`), and a whole IPv6 /64 as one (one
subscriber holds a /64; banning a single address of it would ban nothing). Every method takes
any spelling and groups it itself.

The ban list survives a restart: `run_saver()` (a task in the app's cleanup context) writes it
to `path` whenever it changed, at most once per `_SAVE_INTERVAL_S`, from a thread, as a temporary
file then `os.replace`, so a crash leaves the old list or the new one, never half of one; the
cleanup writes it a last time. Loading skips a bad entry (with one warning for all of them) and
keeps the rest; whenever it skips anything, a whole file that is not a ban list too, the file as
it was is copied to `<path>.broken` first, which no save overwrites: no operator's data is lost
to a typo. Every change happens on the event loop, so concurrent failures need no lock, and one
writer means no two saves race. Both tables are bounded: at most `max_entries` bans (the oldest
evicted first) and as many addresses with recent failures.

Times are wall-clock seconds (`clock`, injectable) because a ban's end must mean the same after
a restart.
"""

from __future__ import annotations

import time
from collections import OrderedDict, deque
from collections.abc import Callable
from ipaddress import IPv6Network, ip_address, ip_network
from pathlib import Path
from typing import Any

import orjson
import structlog

from edge.policy.clients import address_group
from edge.policy.saved import Saved

log = structlog.get_logger(__name__)

# Seconds between two writes of the ban file while bans keep coming (an attack from many
# addresses): the list on disk is at most this old, and the disk is not hammered.
_SAVE_INTERVAL_S = 1.0
# The prefix of an IPv6 group in the file (edge.exchange.address_group).
_IPV6_GROUP = 64


class BanList:
    """Failed-auth counters and bans by client address."""

    def __init__(
        self,
        path: Path | None,
        threshold: int = 10,
        window: float = 600.0,
        period: float = 3600.0,
        max_entries: int = 10_000,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.path = path
        self.threshold = threshold
        self.window = window
        self.period = period
        self.max_entries = max_entries
        self.clock = clock
        self._bans: OrderedDict[str, float] = OrderedDict()  # address -> end (epoch s)
        self._failures: OrderedDict[str, deque[float]] = OrderedDict()
        self.saved = Saved(path, "bans", self._bytes, _SAVE_INTERVAL_S)
        # Told of every ban made here (not of those applied with `quiet`): the edges that
        # share their bans send it on (`edge.cluster.shared`).
        self.on_ban: Callable[[str, float], None] | None = None

    def __len__(self) -> int:
        return len(self._bans)

    def banned_for(self, address: str | None) -> float | None:
        """Seconds left on `address`'s ban, or None when it is not banned."""
        if address is None or not self._bans:
            return None
        address = address_group(address)
        end = self._bans.get(address)
        if end is None:
            return None
        left = end - self.clock()
        if left <= 0:
            del self._bans[address]
            self.saved.changed()
            return None
        return left

    def fail(self, address: str | None) -> bool:
        """Count one failed authentication; True when it got `address` banned."""
        if address is None:
            return False
        address = address_group(address)
        now = self.clock()
        times = self._failures.get(address)
        if times is None:
            if len(self._failures) >= self.max_entries:
                self._failures.popitem(last=False)
            times = self._failures[address] = deque(maxlen=self.threshold)
        else:
            self._failures.move_to_end(address)
        times.append(now)
        while times and times[0] <= now - self.window:
            times.popleft()
        if len(times) < self.threshold:
            return False
        del self._failures[address]
        self.ban(address, now + self.period)
        log.warning(
            "auth.banned",
            client=address,
            failures=self.threshold,
            window_s=self.window,
            period_s=self.period,
        )
        return True

    def ban(self, address: str, until: float, *, quiet: bool = False) -> None:
        """Ban `address` until `until` (epoch s); `quiet`: a ban another edge made, not told
        on. A ban already there that ends later is kept."""
        address = address_group(address)
        current = self._bans.pop(address, None)
        if current is not None and current >= until:
            self._bans[address] = current
            return
        while len(self._bans) >= self.max_entries:
            self._bans.popitem(last=False)  # the oldest ban: it ends first
        self._bans[address] = until
        self.saved.changed()
        if not quiet and self.on_ban is not None:
            self.on_ban(address, until)

    def in_force(self) -> list[tuple[str, float]]:
        """Every ban that has not ended: address and end (epoch s)."""
        now = self.clock()
        return [(address, end) for address, end in self._bans.items() if end > now]

    def load(self) -> None:
        """Read the bans saved by an earlier run; see the module doc for a broken file."""
        if self.path is None:
            return
        try:
            raw = self.path.read_bytes()
        except FileNotFoundError:
            return
        except OSError as exc:
            log.error("bans.load_failed", path=str(self.path), error=str(exc))
            return
        try:
            bans = orjson.loads(raw)["bans"]
            if not isinstance(bans, dict):
                raise TypeError("'bans' is not an object")
        except (ValueError, KeyError, TypeError) as exc:
            log.error("bans.load_failed", path=str(self.path), error=str(exc),
                      kept=self.saved.keep_aside(raw))  # fmt: skip
            return
        now = self.clock()
        live: dict[str, float] = {}
        bad: list[str] = []
        for entry, end in bans.items():
            address, until = _entry(entry, end)
            if address is None or until is None:
                bad.append(entry)
            elif until > now:  # two addresses of one /64 are one ban: the later end holds
                live[address] = max(until, live.get(address, until))
        if bad:
            log.warning(
                "bans.entries_skipped",
                path=str(self.path),
                skipped=len(bad),
                first=bad[:3],
                kept=self.saved.keep_aside(raw),
                hint="each entry maps an IP address (or an IPv6 /64) to the ban's end in Unix "
                "seconds; the others are loaded",
            )
        ordered = sorted((end, address) for address, end in live.items())
        for end, address in ordered[-self.max_entries :]:
            self._bans[address] = end
        if live:
            log.info("bans.loaded", path=str(self.path), bans=len(self._bans))

    def _bytes(self) -> bytes:
        """The live bans as the file's bytes; taken on the event loop, which owns the tables."""
        now = self.clock()
        bans = {address: end for address, end in self._bans.items() if end > now}
        return orjson.dumps({"version": 1, "bans": bans})

    async def close(self) -> None:
        """At shutdown: the last bans saved (`Saved.close`)."""
        await self.saved.close()

    async def run_saver(self) -> None:
        await self.saved.run_saver()


def _entry(address: str, end: Any) -> tuple[str | None, float | None]:
    """One saved ban as (address group, end); (None, None) when it is not one."""
    if isinstance(end, bool) or not isinstance(end, int | float):
        return None, None
    if "/" in address:  # a saved IPv6 group, `2001:db8::/64`, as save() writes them
        try:
            network = ip_network(address.strip())
        except ValueError:
            return None, None
        if not isinstance(network, IPv6Network) or network.prefixlen != _IPV6_GROUP:
            return None, None
        return network.compressed, float(end)
    try:
        ip_address(address.partition("%")[0].strip())  # a zone is no part of the address
    except ValueError:
        return None, None
    return address_group(address), float(end)
