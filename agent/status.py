"""What an operator reads about a running agent: `AgentStatus`, kept by the `StatusBoard`.

The agent keeps one `AgentStatus` and, on every change, rewrites `<state_dir>/status.json`
atomically (write a temporary file, then rename over the old one, so a reader never sees half a
file) and passes the one-line summary to systemd (`STATUS=`, shown by `systemctl status`).
A file rather than a status port: nothing on the workstation listens, and the file survives the
process, so the last disconnect reason is still there after a crash. `backhaul-agent status`
(`agent.status_cmd`) prints it; for graphs and alerts, `agent.metrics` serves the same
`AgentStatus` as Prometheus series on a loopback port, when `metrics_port` asks for one.

The board changes only through one method per event (`tunnel_up`, `model_server_down`, ...):
each says which fields that event sets, and a misspelt field is a type error, not a crash at the
first disconnect. The status fields keep the names scripts read (`upstream_up` is the model
server's state).

An agent holding forwards to several edges (`extra_edges`) lists each in `edges`, with its own
state; the top-level tunnel fields stay the first edge's (`vps`, the first edge registered), so
a one-edge agent's file reads as it always did, and `edges_up` counts the edges up now.
"""

from __future__ import annotations

import dataclasses
import os
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson
import structlog

from agent.errors import TunnelError
from shared.atomic import replace_file

log = structlog.get_logger(__name__)

STATUS_FILE = "status.json"


@dataclass(slots=True)
class EdgeStatus:
    """One edge's forward; the tunnel fields have the top-level fields' names and meaning."""

    edge: str = ""  # host:port dialled
    remote_bind: str = ""
    updated: float = 0.0  # this edge's last event (Unix time); `next_retry_in` is as of it
    connected: bool = False
    connected_since: float | None = None
    connects: int = 0
    reconnects: int = 0
    last_disconnect: float | None = None
    last_disconnect_reason: str | None = None
    last_error: str | None = None
    last_error_kind: str | None = None
    fix: str | None = None
    next_retry_in: float | None = None


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
    edges: list[EdgeStatus] = dataclasses.field(default_factory=list)  # the first is `vps`
    edges_up: int = 0

    def summary(self) -> str:
        """One line for `systemctl status`."""
        if len(self.edges) > 1:
            down = [_why_down(e) for e in self.edges if not e.connected]
            tunnel = ", ".join([f"{self.edges_up}/{len(self.edges)} edges up", *down])
        elif self.connected:
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
        reconnects = sum(e.reconnects for e in self.edges) if self.edges else self.reconnects
        return f"tunnel {tunnel}; {model}; {reconnects} reconnects"


_Tunnel = AgentStatus | EdgeStatus  # both carry the tunnel fields


def _why_down(e: EdgeStatus) -> str:
    if e.last_error:
        return f"{e.edge} down ({e.last_error_kind}: {e.last_error})"
    return f"{e.edge} down ({e.last_disconnect_reason or 'connecting'})"


class StatusBoard:
    """Owns the `AgentStatus`: records each event, writes the file, tells the listener (systemd)."""

    def __init__(
        self,
        path: Path | None,
        on_change: Callable[[AgentStatus], object] | None = None,
        *,
        vps: str = "",
        remote_bind: str = "",
        upstream: str = "",
        warm_models: Iterable[str] = (),
    ) -> None:
        now = time.time()
        self.status = AgentStatus(
            pid=os.getpid(),
            started=now,
            updated=now,
            vps=vps,
            remote_bind=remote_bind,
            upstream=upstream,
            warm_models=list(warm_models),
        )
        self._edges: dict[str, EdgeStatus] = {}
        self._path = path
        self._on_change = on_change
        self._write_failed = False

    def add_edge(self, edge: str, remote_bind: str) -> None:
        """List the edge `edge` (host:port); on a board made without `vps`, the first one added
        is the one the top-level fields describe."""
        if not self.status.vps:
            self.status.vps, self.status.remote_bind = edge, remote_bind
        if edge not in self._edges:
            self._edges[edge] = EdgeStatus(edge, remote_bind)
            self.status.edges.append(self._edges[edge])

    def _tunnels(self, edge: str | None) -> list[_Tunnel]:
        """Where an event on `edge` is recorded, now: its entry, and the top level for the first
        edge (None: the first edge, for a board used without `add_edge`)."""
        name = self.status.vps if edge is None else edge
        found: list[_Tunnel] = [self.status] if name == self.status.vps else []
        if name in self._edges:
            self._edges[name].updated = time.time()
            found.append(self._edges[name])
        return found

    def publish(self) -> None:
        """Stamp the time, write the file and notify; every event below ends here."""
        self.status.updated = time.time()
        self.status.edges_up = sum(e.connected for e in self.status.edges)
        self._write()
        if self._on_change is not None:
            self._on_change(self.status)

    def tunnel_up(self, connects: int, edge: str | None = None) -> None:
        """The forward to `edge` is up, for the `connects`-th time since start."""
        now = time.time()
        for s in self._tunnels(edge):
            s.connected, s.connected_since = True, now
            s.connects, s.reconnects = connects, connects - 1
            s.last_error = s.last_error_kind = s.fix = None
            s.next_retry_in = None
        self.publish()

    def tunnel_down(self, reason: str, edge: str | None = None) -> None:
        """An established connection to `edge` ended."""
        now = time.time()
        for s in self._tunnels(edge):
            s.connected, s.connected_since = False, None
            s.last_disconnect, s.last_disconnect_reason = now, reason
        self.publish()

    def tunnel_failed(self, err: TunnelError, edge: str | None = None) -> None:
        """An attempt failed, or a session ended in a way the loop treats as a failure."""
        for s in self._tunnels(edge):
            s.connected = False
            s.last_error, s.last_error_kind, s.fix = err.message, err.kind, err.fix or None
        self.publish()

    def retry_in(self, delay: float, edge: str | None = None) -> None:
        """The next attempt to `edge` is due in `delay` seconds."""
        for s in self._tunnels(edge):
            s.next_retry_in = round(delay, 3)
        self.publish()

    def stopped(self) -> None:
        """The agent is stopping: no connection, and no retry coming."""
        everywhere: list[_Tunnel] = [self.status, *self.status.edges]
        for s in everywhere:
            s.connected, s.connected_since, s.next_retry_in = False, None, None
        self.publish()

    def model_server_up(self, kind: str, version: str | None) -> None:
        s = self.status
        s.upstream_up, s.upstream_kind, s.upstream_version = True, kind, version
        s.upstream_reason = None
        self.publish()

    def model_server_down(self, reason: str) -> None:
        self.status.upstream_up, self.status.upstream_reason = False, reason
        self.publish()

    def models_warmed(self, models: Iterable[str]) -> None:
        """A warm-up round ended with `models` loaded."""
        self.status.warmed = sorted(models)
        self.publish()

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
    status = AgentStatus(**_known(AgentStatus, data))
    status.edges = [EdgeStatus(**_known(EdgeStatus, edge)) for edge in data.get("edges", [])]
    return status


def _known(cls: type[AgentStatus | EdgeStatus], data: dict[str, object]) -> dict[str, Any]:
    """`data`'s fields that `cls` has: a file from another version still reads."""
    names = {f.name for f in dataclasses.fields(cls)}
    return {k: v for k, v in data.items() if k in names}
