"""Several edges that agree, through Redis (DESIGN.md §7.3; docs/scaling.md).

`open_cluster()` builds what an edge with `redis_url` shares: the link (`link`), the rate limits
(`limits`), the bans and keys (`shared`), the GPU gate's leases (`leases`). Without `redis_url`
there is no `Cluster`, and nothing here is imported by the edge's request path.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable, Coroutine
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

from edge.cluster.leases import SharedLeases
from edge.cluster.limits import SharedLimits
from edge.cluster.link import RedisLink, default_edge_id, open_link
from edge.cluster.shared import SharedBans, SharedBudgets, SharedKeys
from edge.policy.budgets import LocalBudgets
from edge.policy.guard import Guard
from edge.settings import EdgeSettings
from edge.upstreams.pool import Pool

Loop = Callable[[], Coroutine[Any, Any, None]]


@dataclass(frozen=True, slots=True, eq=False)
class Cluster:
    link: RedisLink
    limits: SharedLimits
    bans: SharedBans
    keys: SharedKeys | None  # None with auth=none
    leases: SharedLeases
    budgets: SharedBudgets

    def loops(self) -> list[tuple[str, Loop]]:
        loops: list[tuple[str, Loop]] = [
            ("redis-link", self.link.run),
            ("redis-events", self.link.run_events),
            ("redis-bans", self.bans.run),
            ("redis-leases", self.leases.run),
            ("redis-budgets", self.budgets.run),
        ]
        if self.keys is not None:
            loops.append(("redis-keys", self.keys.run))
        return loops


@asynccontextmanager
async def open_cluster(
    settings: EdgeSettings, guard: Guard, pool: Pool, budgets: LocalBudgets
) -> AsyncIterator[Cluster]:
    """The shared state of `settings.redis_url`, wired into `guard` and `pool`; `budgets`, the
    edge's own spend store, stays the copy a restart while Redis is away starts from."""
    assert settings.redis_url is not None
    edge_id = settings.edge_id or default_edge_id(settings.port)
    async with open_link(
        settings.redis_url, settings.redis_password_file, settings.redis_timeout, edge_id
    ) as link:
        limits = SharedLimits(link, guard.local_limits, settings.redis_local_share)
        guard.limits = limits
        keys = None
        if guard.keys is not None:
            keys = SharedKeys(link, guard.keys, settings.keys_shared_path)
            keys.load_saved()
        shared_budgets = SharedBudgets(link, budgets)
        guard.budgets = shared_budgets
        yield Cluster(
            link,
            limits,
            SharedBans(link, guard.bans),
            keys,
            SharedLeases(link, pool),
            shared_budgets,
        )
