"""What an operator reads about a running agent: `status.json` and `backhaul-agent status`.

The agent keeps one `AgentStatus` and, on every change, rewrites `<state_dir>/status.json`
atomically (write a temporary file, then rename over the old one, so a reader never sees half a
file) and passes the one-line summary to systemd (`STATUS=`, shown by `systemctl status`).
A file rather than a status port: nothing on the workstation listens, and the file survives the
process, so the last disconnect reason is still there after a crash. `backhaul-agent status`
prints it and exits 0 when the tunnel and the model server are both up, 1 when either is down,
3 when no running agent wrote it. For graphs and alerts, `agent.metrics` serves the same
`AgentStatus` as Prometheus series on a loopback port, when `metrics_port` asks for one.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson
import structlog

from agent.settings import AgentSettings
from shared.atomic import replace_file
from shared.errors import ConfigError

log = structlog.get_logger(__name__)

STATUS_FILE = "status.json"

# Exit statuses of `backhaul-agent status`, for scripts and monitoring checks.
EXIT_UP, EXIT_DEGRADED, EXIT_UNKNOWN = 0, 1, 3


@dataclass(slots=True)
class AgentStatus:
    """The agent's state as of `updated` (Unix time); field names are what scripts read."""

    pid: int = 0
    started: float = 0.0
    updated: float = 0.0
    vps: str = ""  # host:port dialled
    remote_bind: str = ""
    connected: bool = False
    connected_since: float | None = None
    connects: int = 0  # successful connections since start
    reconnects: int = 0  # connects after the first
    last_disconnect: float | None = None
    last_disconnect_reason: str | None = None
    last_error: str | None = None
    last_error_kind: str | None = None  # transient, permanent
    fix: str | None = None  # what the operator should change, for permanent errors
    next_retry_in: float | None = None  # seconds, as of `updated`
    upstream: str = ""
    upstream_up: bool | None = None  # None: not probed yet
    upstream_kind: str | None = None  # ollama, openai
    upstream_version: str | None = None
    upstream_reason: str | None = None
    warm_models: list[str] = dataclasses.field(default_factory=list)
    warmed: list[str] = dataclasses.field(default_factory=list)

    def summary(self) -> str:
        """One line for `systemctl status`."""
        if self.connected:
            tunnel = f"forwarding {self.vps} {self.remote_bind}"
        elif self.last_error:
            retry = (
                f", retry in {self.next_retry_in:.1f}s" if self.next_retry_in is not None else ""
            )
            tunnel = f"down ({self.last_error_kind}: {self.last_error}{retry})"
        else:
            tunnel = f"connecting to {self.vps}"
        if self.upstream_up is None:
            model = "model server not probed yet"
        elif self.upstream_up:
            model = f"model server up ({self.upstream_kind} {self.upstream_version or ''})".strip()
        else:
            model = f"model server down ({self.upstream_reason})"
        return f"tunnel {tunnel}; {model}; {self.reconnects} reconnects"


class StatusBoard:
    """Owns the `AgentStatus`: updates it, writes the file, tells the listener (systemd)."""

    def __init__(
        self,
        path: Path | None,
        on_change: Callable[[AgentStatus], object] | None = None,
        **initial: Any,
    ) -> None:
        now = time.time()
        self.status = AgentStatus(pid=os.getpid(), started=now, updated=now, **initial)
        self._path = path
        self._on_change = on_change
        self._write_failed = False

    def update(self, **changes: Any) -> None:
        """Apply `changes`, stamp the time, write the file and notify."""
        for name, value in changes.items():
            setattr(self.status, name, value)
        self.status.updated = time.time()
        self._write()
        if self._on_change is not None:
            self._on_change(self.status)

    def _write(self) -> None:
        # Synchronous on purpose: a few hundred bytes on a state change, rare, and a rename is
        # what makes it atomic; ordering with the next update stays trivial.
        if self._path is None:
            return
        data = orjson.dumps(self.status, option=orjson.OPT_INDENT_2)
        try:
            # Readable by the operator's `status` command; not fsynced: it is rewritten on every
            # change, and after a power cut the agent is not running anyway.
            replace_file(self._path, data, 0o644, durable=False)
        except OSError as exc:
            if not self._write_failed:
                log.warning("status.unwritable", path=str(self._path), error=str(exc))
                self._write_failed = True


def read_status(path: Path) -> AgentStatus | None:
    """The last status written at `path`, or None if there is none or it is unreadable."""
    try:
        data = orjson.loads(path.read_bytes())
    except (OSError, orjson.JSONDecodeError):
        return None
    names = {f.name for f in dataclasses.fields(AgentStatus)}
    return AgentStatus(**{k: v for k, v in data.items() if k in names})


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # it exists, under another user (DynamicUser)
        return True
    return True


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
    path = state_dir / STATUS_FILE
    status = read_status(path)
    if status is None:
        print(f"no agent status at {path} (is the agent running with this state directory?)")
        return EXIT_UNKNOWN
    running = _alive(status.pid)
    if args.json:
        sys.stdout.write(orjson.dumps(status, option=orjson.OPT_INDENT_2).decode() + "\n")
    else:
        print(_render(status, running))
    if not running:
        return EXIT_UNKNOWN
    return EXIT_UP if status.connected and status.upstream_up else EXIT_DEGRADED


def _ago(then: float | None, now: float) -> str:
    return "never" if then is None else f"{now - then:.0f}s ago"


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
    state = {None: "not probed yet", True: "UP", False: "DOWN"}[s.upstream_up]
    detail = s.upstream_reason if s.upstream_up is False else s.upstream_version
    kind = f" {s.upstream_kind}" if s.upstream_kind else ""
    lines.append(f"model server {state} at {s.upstream}{kind}" + (f" ({detail})" if detail else ""))
    if s.warm_models:
        lines.append(
            f"warm models  {', '.join(s.warmed) or 'none yet'} of {', '.join(s.warm_models)}"
        )
    return "\n".join(lines)
