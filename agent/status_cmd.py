"""`backhaul-agent status`: print what the running agent last wrote to `status.json`.

It reads the file (`agent.status`) rather than asking the agent, so it works when the agent is
stuck, crashed or stopped, and says so: it exits 0 when the tunnel and the model server are both
up, 1 when either is down, 3 when no running agent wrote it (the file is missing, or its process
is gone), 2 for settings it cannot read. With several edges, "the tunnel is up" means every
edge's forward is: one edge down is a degraded agent (its clients get 503s), so it exits 1.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import orjson

from agent import platforms
from agent.settings import AgentSettings
from agent.status import STATUS_FILE, AgentStatus, EdgeStatus, read_status
from shared.errors import ConfigError

# Exit statuses, for scripts and monitoring checks.
EXIT_UP, EXIT_DEGRADED, EXIT_UNKNOWN = 0, 1, 3


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    parser = subparsers.add_parser(
        "status",
        help="show the running agent's tunnel and model-server state",
        description="Read <state_dir>/status.json. Exit 0 if the tunnel and the model server "
        "are up, 1 if either is down, 3 if no running agent wrote it.",
    )
    parser.add_argument("--config", type=Path, help="TOML settings file")
    parser.add_argument("--state-dir", type=Path, help="the agent's state directory")
    parser.add_argument("--json", action="store_true", help="print the raw JSON")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    state_dir: Path | None = args.state_dir
    if state_dir is None:  # --state-dir skips reading the settings
        try:
            state_dir = AgentSettings.load(args.config).state_dir
        except ConfigError as exc:
            print(f"backhaul-agent status: {exc}", file=sys.stderr)
            return 2
    return report(state_dir, as_json=args.json)


def report(state_dir: Path, *, as_json: bool) -> int:
    """Print the status in `state_dir` (as JSON, or for a person); the exit status above."""
    path = state_dir / STATUS_FILE
    status = read_status(path)
    if status is None:
        print(f"no agent status at {path} (is the agent running with this state directory?)")
        return EXIT_UNKNOWN
    running = platforms.pid_alive(status.pid)
    if as_json:
        sys.stdout.write(orjson.dumps(status, option=orjson.OPT_INDENT_2).decode() + "\n")
    else:
        print(_render(status, running))
    if not running:
        return EXIT_UNKNOWN
    return EXIT_UP if _all_up(status) and status.upstream_up else EXIT_DEGRADED


def _all_up(s: AgentStatus) -> bool:
    return all(e.connected for e in s.edges) if s.edges else s.connected


def _ago(then: float | None, now: float) -> str:
    return "never" if then is None else f"{now - then:.0f}s ago"


def _render_edge(e: EdgeStatus, now: float) -> str:
    """One edge as an indented block: its state, and why it is down with the fix."""
    if e.connected:
        return f"  {e.edge}  UP since {_ago(e.connected_since, now)}, listening on {e.remote_bind}"
    lines = [f"  {e.edge}  DOWN, last drop {_ago(e.last_disconnect, now)}"]
    if e.last_disconnect_reason:
        lines[0] += f": {e.last_disconnect_reason}"
    if e.last_error:
        retry = ""
        if e.next_retry_in is not None:
            retry = f", retry in {max(0.0, e.next_retry_in - (now - e.updated)):.1f}s"
        lines.append(f"    error {e.last_error_kind}: {e.last_error}{retry}")
    if e.fix:
        lines.append(f"    fix   {e.fix}")
    return "\n".join(lines)


def _render(s: AgentStatus, running: bool) -> str:
    now = time.time()
    lines = [
        f"agent        pid {s.pid} {'running' if running else 'NOT RUNNING (last state below)'}, "
        f"updated {_ago(s.updated, now)}",
        f"tunnel       {'UP' if s.connected else 'DOWN'} to {s.vps}, listening on {s.remote_bind}"
        + (f" since {_ago(s.connected_since, now)}" if s.connected else ""),
        f"reconnects   {s.reconnects} (connects {s.connects})",
        f"last drop    {_ago(s.last_disconnect, now)}"
        + (f": {s.last_disconnect_reason}" if s.last_disconnect_reason else ""),
    ]
    if s.last_error and not s.connected:
        lines.append(f"last error   {s.last_error_kind}: {s.last_error}")
        if s.next_retry_in is not None:
            lines.append(f"next retry   in {max(0.0, s.next_retry_in - (now - s.updated)):.1f}s")
    if s.fix and not s.connected:
        lines.append(f"fix          {s.fix}")
    if len(s.edges) > 1:
        lines.append(
            f"edges        {s.edges_up} of {len(s.edges)} up (the tunnel above: the first)"
        )
        lines.extend(_render_edge(e, now) for e in s.edges)
    state = {None: "not probed yet", True: "UP", False: "DOWN"}[s.upstream_up]
    detail = s.upstream_reason if s.upstream_up is False else s.upstream_version
    kind = f" {s.upstream_kind}" if s.upstream_kind else ""
    lines.append(f"model server {state} at {s.upstream}{kind}" + (f" ({detail})" if detail else ""))
    if s.warm_models:
        lines.append(
            f"warm models  {', '.join(s.warmed) or 'none yet'} of {', '.join(s.warm_models)}"
        )
    return "\n".join(lines)
