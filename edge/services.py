"""`Edge`: the edge's app-wide objects, built in one place and one order by `open_edge()`.

One typed owner instead of a dozen app keys spread over modules (the old `edge/state.py`):
`open_edge(settings)` builds every long-lived object, runs every background loop (the upstream
probe, the bans and budgets savers, the keys watcher, the report of suppressed anonymous
refusals) in one `TaskGroup`, and closes everything in reverse order through one exit stack.
Production (`edge.serve`) and the tests (`tests/support/servers.py`) both build the edge with it
and hand the result to `create_app(edge)`; aiohttp sees one finished object under `EDGE`.

Only handlers read `request.app[EDGE]`; everything below a handler gets its collaborators as
arguments. This module imports no handler, so it never closes an import cycle.

Structured concurrency: a background loop never ends on its own. One that fails is logged with
its traceback (`edge.loop_failed`) and, through the task group, cancels the body of
`async with open_edge(...)`: the edge stops with the loop's exception (an `ExceptionGroup`),
which `serve` turns into a non-zero exit so systemd restarts it, instead of serving on with a
frozen upstream state or an unsaved ban list.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable, Coroutine, Mapping
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass
from functools import partial
from typing import Any

import structlog
from aiohttp import web

from edge.cluster import Cluster, open_cluster
from edge.metrics import EdgeMetrics
from edge.models import ModelPolicy
from edge.policy.admission import http_admission
from edge.policy.bans import BanList
from edge.policy.budgets import LocalBudgets
from edge.policy.clients import ClientAddress
from edge.policy.guard import Guard
from edge.policy.keys import KeyStore
from edge.policy.listeners import Listeners, ListenersCollector
from edge.proxy.body_limits import BodyLimits
from edge.proxy.body_policy import BodyPolicy
from edge.proxy.features import Feature, build_features
from edge.settings import EdgeSettings
from edge.telemetry import TelemetryWriter
from edge.upstreams import connections
from edge.upstreams.channels import Tunnels
from edge.upstreams.cloud import Fallbacks, open_clouds
from edge.upstreams.connections import Sessions
from edge.upstreams.pool import Pool, build_pool
from edge.upstreams.sshd import EmbeddedSSHServer

log = structlog.get_logger(__name__)


@dataclass(frozen=True, slots=True, eq=False)
class Edge:
    """Everything the edge's handlers use, built by `open_edge()`."""

    settings: EdgeSettings
    clients: ClientAddress  # who the client is, through trusted proxies
    models: ModelPolicy
    body_policy: BodyPolicy
    body_limits: BodyLimits
    pool: Pool  # the workstations (agents), their monitors and the GPU gate
    sessions: Sessions  # HTTP connections to the upstream
    telemetry: TelemetryWriter
    guard: Guard  # keys, limits, bans
    features: Mapping[str, Feature]  # by raw path, `/features/NAME`
    metrics: EdgeMetrics
    listeners: Listeners  # connection caps at accept, per listener
    sshd: EmbeddedSSHServer | None  # the embedded SSH server, when `ssh_port` is set
    cluster: Cluster | None  # the state several edges share, when `redis_url` is set
    fallbacks: Fallbacks  # the clouds a request may fall back to (none unless configured)


EDGE = web.AppKey("edge", Edge)


@asynccontextmanager
async def open_edge(settings: EdgeSettings) -> AsyncIterator[Edge]:
    """Build the edge, run its background loops for the body of the `async with`, close it.

    Error handling: raises `ConfigError` (before anything is opened) when the keys file is there
    but cannot be used, the model server's API key file cannot be read, or a state path is not
    a regular file; and the `ExceptionGroup` of a background loop that failed.
    """
    keys = KeyStore(settings.keys_path) if settings.auth == "keys" else None
    if keys is not None:
        keys.load_at_start()  # a keys file that cannot be used stops the edge here
    upstream_key = connections.read_api_key(settings.upstream_api_key_file)
    clients = ClientAddress(settings.trusted_proxies)
    models = ModelPolicy(settings.models)
    bans = BanList(
        settings.bans_path,
        settings.ban_threshold,
        settings.ban_window,
        settings.ban_period,
        settings.max_tracked_clients,
    )
    budgets = LocalBudgets(settings.budgets_path)
    budgets.load()  # a budgets path that is not a regular file stops the edge here
    guard = Guard(settings, keys, bans, budgets)
    pool = build_pool(settings)
    async with AsyncExitStack() as stack:
        telemetry = TelemetryWriter(
            settings.telemetry_path, settings.telemetry_max_bytes, settings.telemetry_backups
        )
        stack.push_async_callback(telemetry.aclose)
        tunnels = Tunnels() if settings.ssh_port else None
        sessions = await stack.enter_async_context(
            connections.sessions(settings, upstream_key, tunnels)
        )
        metrics = EdgeMetrics(settings.models, pool, telemetry)
        fallbacks = await stack.enter_async_context(open_clouds(settings))
        cluster = None
        if settings.redis_url is not None:
            cluster = await stack.enter_async_context(open_cluster(settings, guard, pool, budgets))
            metrics.live.link = cluster.link
        listeners = Listeners(http_admission(settings))
        metrics.registry.register(ListenersCollector(listeners))
        sshd = None
        if settings.ssh_port:
            sshd = EmbeddedSSHServer(settings, pool.attach, pool.detach, tunnels=tunnels)
            await sshd.start()
            stack.push_async_callback(sshd.close)
            listeners.others.append(sshd.admission)
            for name in sshd.names():
                pool.expect(name)
        edge = Edge(
            settings=settings,
            clients=clients,
            models=models,
            body_policy=BodyPolicy(
                models, settings.max_output_tokens, settings.max_choices, settings.extra_fields
            ),
            body_limits=BodyLimits(
                max_prompt_chars=settings.max_prompt_chars,
                max_prompt_words=settings.max_prompt_words,
                max_messages=settings.max_messages,
                max_images=settings.max_images,
            ),
            pool=pool,
            sessions=sessions,
            telemetry=telemetry,
            guard=guard,
            features=build_features(settings),
            metrics=metrics,
            listeners=listeners,
            sshd=sshd,
            cluster=cluster,
            fallbacks=fallbacks,
        )
        guard.start()
        stack.push_async_callback(guard.close)  # the last ban list and report are kept
        stack.push_async_callback(budgets.close)  # and the last spend
        try:
            async with asyncio.TaskGroup() as group:
                tasks = [
                    group.create_task(_supervised(name, loop), name=name)
                    for name, loop in _loops(edge, budgets)
                ]
                try:
                    yield edge
                finally:
                    for task in tasks:
                        task.cancel()
        except BaseExceptionGroup as failed:
            # One failure (the body's own, or a loop's) leaves as itself, as from a plain `with`.
            if len(failed.exceptions) == 1:
                raise failed.exceptions[0] from None
            raise


Loop = Callable[[], Coroutine[Any, Any, None]]


def _loops(edge: Edge, budgets: LocalBudgets) -> list[tuple[str, Loop]]:
    """Every background loop of the edge, by name; each started only when its task runs."""
    loops: list[tuple[str, Loop]] = [
        ("probe", partial(edge.pool.run, edge.sessions.pooled)),
        ("bans-saver", edge.guard.bans.run_saver),
        ("budgets-saver", budgets.run_saver),
        ("suppressed-reporter", edge.guard.anonymous.run_reporter),
    ]
    if edge.cluster is not None:
        loops += edge.cluster.loops()
    keys = edge.guard.keys
    if keys is not None:
        loops.append(("keys-watcher", partial(keys.watch, edge.settings.keys_reload_interval)))
    return loops


async def _supervised(name: str, loop: Loop) -> None:
    """Run one loop; its failure is logged with the traceback and stops the edge."""
    try:
        await loop()
    except Exception:
        log.exception("edge.loop_failed", loop=name)
        raise
    raise RuntimeError(f"the edge's {name} loop ended; it should run until the edge stops")
