"""`backhaul-agent run`: keep the tunnels up and watch the local model server until SIGTERM.

The process owns its tasks in one task group: a tunnel loop per edge (`ssh_host`, then each of
`extra_edges`), the model-server probe, the systemd watchdog ping, and the READY=1 that waits
for the first forward on any edge. SIGTERM and SIGINT cancel them (each tunnel closes its
connection first) and the process exits 0 within a second; SIGHUP makes every tunnel reconnect
at once (`systemctl reload backhaul-agent`).

Edges are independent: each loop sorts its own failures and backs off on its own, so an edge
that is down, refuses the key or pins the wrong host key costs the others nothing. What escapes
a loop is a bug, not an edge's state: it is logged with its edge and stops the agent, as with
one edge (systemd restarts it), rather than leave a forward silently missing.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
from pathlib import Path

import structlog

from agent import ssh
from agent.metrics import run_metrics
from agent.model_server import API_KEY_SETTING, ModelServer
from agent.settings import AgentSettings
from agent.status import STATUS_FILE, AgentStatus, StatusBoard
from agent.tunnel import Tunnel
from shared import runtime
from shared.errors import ConfigError
from shared.logging import configure_logging
from shared.notify import Notifier, SystemdEnv
from shared.secrets import read_key_file

log = structlog.get_logger(__name__)


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    parser = subparsers.add_parser(
        "run", help="dial the VPS and keep the reverse forward up", description=__doc__
    )
    parser.add_argument("--config", type=Path, help="TOML file (default /etc/backhaul/agent.toml)")
    parser.add_argument("--ssh-host", help="VPS address")
    parser.add_argument("--ssh-port", type=int, help="VPS SSH port (2222 embedded, 22 sshd)")
    parser.add_argument("--ssh-user", help="SSH user on the VPS")
    parser.add_argument("--key-path", type=Path, help="the agent's private key")
    parser.add_argument("--known-hosts", type=Path, help="the pinned VPS host key(s)")
    parser.add_argument("--remote-bind", help="VPS loopback host:port (127.0.0.1:11434)")
    parser.add_argument("--upstream", help="local model server URL (http://127.0.0.1:11434)")
    parser.add_argument("--state-dir", type=Path, help="where status.json is written")
    parser.add_argument("--log-level", help="debug, info, warning, error")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    try:
        settings = AgentSettings.load_args(
            args,
            "ssh_host",
            "ssh_port",
            "ssh_user",
            "key_path",
            "known_hosts",
            "remote_bind",
            "upstream",
            "state_dir",
            "log_level",
        )
        # Fail at start, not at the first connect, on what only the operator can fix.
        ssh.load_client_key(settings)
        for edge in settings.per_edge():
            ssh.load_known_hosts(edge)
        read_key_file(settings.upstream_api_key_file, API_KEY_SETTING)
    except ConfigError as exc:
        print(f"backhaul-agent: {exc}", file=sys.stderr)
        return 2
    configure_logging(settings.log_level, settings.log_format)  # type: ignore[arg-type]
    notifier = Notifier.from_env(SystemdEnv())
    try:
        return runtime.run(serve(settings, notifier))
    finally:
        notifier.close()


async def serve(
    settings: AgentSettings,
    notifier: Notifier | None = None,
    stop: asyncio.Event | None = None,
) -> int:
    """Run the agent until `stop` is set (SIGTERM, SIGINT); returns the exit status.

    Resource handling: every task lives in one task group; a crash in any of them cancels the
    others and propagates (systemd restarts the service). An edge's failures are not crashes:
    its own tunnel loop retries them.
    """
    notifier = notifier or Notifier(None)
    remote = f"{settings.ssh_host}:{settings.ssh_port}"

    def on_change(status: AgentStatus) -> None:
        notifier.status(status.summary())

    board = StatusBoard(
        settings.state_dir / STATUS_FILE,
        on_change,
        vps=remote,
        remote_bind=settings.remote_bind,
        upstream=settings.upstream,
        warm_models=list(settings.warm_models),
    )
    tunnels = [Tunnel(edge, board) for edge in settings.per_edge()]
    model_server = ModelServer(settings, board)

    def reconnect_all() -> None:
        for tunnel in tunnels:
            tunnel.reconnect_now()

    with runtime.stop_on_signals(stop, on_sighup=reconnect_all) as stop:
        log.info(
            "agent.starting",
            vps=remote,
            remote_bind=settings.remote_bind,
            model_server=settings.upstream,
            edges=[tunnel.edge for tunnel in tunnels],
        )
        board.publish()
        runtime.tune_gc()  # every forwarded byte crosses this loop: no GC pauses on its tail
        async with asyncio.TaskGroup() as tg:
            tasks = [tg.create_task(_hold(t), name=f"tunnel {t.edge}") for t in tunnels]
            tasks += [
                tg.create_task(model_server.run(), name="model-server"),
                tg.create_task(notifier.run_watchdog(), name="watchdog"),
                tg.create_task(_ready_when_up(tunnels, notifier, board), name="ready"),
            ]
            if settings.metrics_port:
                tasks.append(
                    tg.create_task(run_metrics(board, settings.metrics_port), name="metrics")
                )
            await stop.wait()
            notifier.stopping()
            log.info("agent.stopping")
            for task in tasks:
                task.cancel()
    board.stopped()
    log.info("agent.stopped")
    return 0


async def _hold(tunnel: Tunnel) -> None:
    """One edge's loop; it never ends but by cancellation or a bug, said with its edge."""
    try:
        await tunnel.run_tunnel()
    except Exception:
        log.exception("agent.tunnel_crashed", edge=tunnel.edge)
        raise


async def wait_any_up(tunnels: list[Tunnel]) -> Tunnel:
    """Return the first tunnel whose forward is up (at once if one is)."""
    async with asyncio.TaskGroup() as tg:
        waits = {tg.create_task(t.wait_up()): t for t in tunnels}
        done, pending = await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
        for task in pending:
            task.cancel()
    return waits[done.pop()]


async def _ready_when_up(tunnels: list[Tunnel], notifier: Notifier, board: StatusBoard) -> None:
    first = await wait_any_up(tunnels)
    notifier.ready(board.status.summary())
    log.info("agent.ready", edge=first.edge)
