"""The agent's settings (`BACKHAUL_AGENT_...`, `/etc/backhaul/agent.toml`); see DESIGN.md §6.

Relative paths are relative to the working directory; the systemd unit runs the agent in its
state directory (`/var/lib/backhaul-agent`, also `state_dir`'s default, so `backhaul-agent
status` finds the file with no settings) and hands it the private key as a credential. On macOS
and Windows both defaults follow the OS (`agent.platforms`: `~/Library/Application Support`,
`%ProgramData%`).
"""

from __future__ import annotations

from pathlib import Path
from typing import ClassVar, Literal
from urllib.parse import urlsplit

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator
from pydantic_settings import SettingsConfigDict

from agent import platforms
from shared.protocol import TUNNEL_PORT
from shared.settings import BackhaulSettings, url_address


def _check_bind(value: str) -> str:
    host, sep, port = value.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError("remote_bind must be host:port, e.g. 127.0.0.1:11434")
    return value


class EdgeTarget(BaseModel):
    """One more VPS the agent dials, besides `ssh_host`; unset fields are the agent's own."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    # The VPS's address and SSH port, as for `ssh_host` and `ssh_port`.
    host: str
    port: int = Field(2222, ge=1, le=65535)
    # The SSH user on this VPS; unset: the agent's `ssh_user`.
    user: str | None = None
    # The file pinning this VPS's host key; unset: the agent's `known_hosts` (one file may pin
    # every edge, a line each).
    known_hosts: Path | None = None
    # The loopback host:port to listen on there (that edge's BACKHAUL_EDGE_UPSTREAM); unset: the
    # agent's `remote_bind`.
    remote_bind: str | None = None

    @field_validator("remote_bind")
    @classmethod
    def _host_port(cls, value: str | None) -> str | None:
        return None if value is None else _check_bind(value)

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"


class AgentSettings(BackhaulSettings):
    """Everything the agent process reads at start; one frozen instance built in `main()`."""

    model_config = SettingsConfigDict(env_prefix="BACKHAUL_AGENT_")
    default_config_file: ClassVar[Path | None] = Path(platforms.default_config_file())

    # Where to dial: the VPS's sshd (22) or the edge's embedded server (2222, the default). This
    # is the first edge; `extra_edges` lists the others.
    ssh_host: str = "127.0.0.1"
    ssh_port: int = Field(2222, ge=1, le=65535)
    ssh_user: str = "backhaul"
    key_path: Path = Path("agent_ed25519_key")
    # OpenSSH known_hosts format; the only trust anchor for the VPS (there is no "accept any").
    known_hosts: Path = Path("known_hosts")
    # The VPS loopback address the forward listens on; the edge's BACKHAUL_EDGE_UPSTREAM.
    remote_bind: str = f"127.0.0.1:{TUNNEL_PORT}"
    # More edges (VPSes behind DNS or a load balancer) to hold a forward to at the same time,
    # each on its own connection with its own backoff and status; in TOML, one `[[extra_edges]]`
    # table each (`host = "vps2.example.net"`). Empty (the default): only `ssh_host`.
    extra_edges: list[EdgeTarget] = []
    # The local model server the forward ends at.
    upstream: str = "http://127.0.0.1:11434"  # Ollama's own port, on the workstation
    # A file holding the model server's own API key (vLLM's or llama.cpp's `--api-key`), sent as
    # `Authorization: Bearer` on the agent's probe and warm-up; read at start, never logged.
    upstream_api_key_file: Path | None = None

    # Dead-peer detection: interval x (count_max + 1) seconds of silence ends the connection.
    keepalive_interval: float = Field(10.0, gt=0)
    keepalive_count_max: int = Field(3, ge=1)
    # Seconds. The TCP connect, then the SSH handshake and login.
    connect_timeout: float = Field(10.0, gt=0)
    login_timeout: float = Field(15.0, gt=0)
    # Reconnect pacing (s): full-jitter exponential from `backoff_initial` up to `backoff_max`;
    # the sequence restarts only once a connection stayed up `stable_after` seconds.
    backoff_initial: float = Field(1.0, gt=0)
    backoff_max: float = Field(30.0, gt=0)
    stable_after: float = Field(30.0, ge=0)
    # OpenSSH < 10.1 sets TCP_NODELAY on its socket only when a session runs a command; without
    # one, small forwarded messages wait ~40 ms for a delayed ACK (docs/deploy.md). "auto" runs
    # one harmless command (the key's forced `/bin/false`) when the server is OpenSSH.
    open_session: Literal["auto", "always", "never"] = "auto"

    # Local model server: probe period and timeout (s); models kept loaded; how long Ollama
    # keeps them; re-warm period (s), under Ollama's default 5 min keep_alive that any request
    # without one resets the expiry to; 0 = only when the server comes (back) up.
    probe_interval: float = Field(10.0, gt=0)
    probe_timeout: float = Field(3.0, gt=0)
    warm_models: list[str] = []
    warm_keep_alive: str = "30m"
    warm_interval: float = Field(240.0, ge=0)

    # Where `status.json` lives (what `backhaul-agent status` reads): the systemd unit's
    # StateDirectory, never the working directory.
    state_dir: Path = Path(platforms.default_state_dir())
    # Prometheus `/metrics` on 127.0.0.1 at this port (agent.metrics); 0 = off, the default:
    # nothing on the workstation listens unless asked to.
    metrics_port: int = Field(0, ge=0, le=65535)

    @field_validator("remote_bind")
    @classmethod
    def _host_port(cls, value: str) -> str:
        return _check_bind(value)

    @model_validator(mode="after")
    def _distinct_edges(self) -> AgentSettings:
        # Two connections with one key to one edge replace each other forever (`Replaced`).
        seen = {f"{self.ssh_host}:{self.ssh_port}"}
        for target in self.extra_edges:
            if target.address in seen:
                raise ValueError(f"edge {target.address} is listed twice")
            seen.add(target.address)
        return self

    @field_validator("upstream")
    @classmethod
    def _http_url(cls, value: str) -> str:
        parts = urlsplit(value)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError("upstream must be an http:// or https:// URL")
        return value.rstrip("/")

    @property
    def remote_address(self) -> tuple[str, int]:
        """`remote_bind` split into the listen host and port requested from the VPS."""
        host, _, port = self.remote_bind.rpartition(":")
        return host.strip("[]"), int(port)

    def per_edge(self) -> list[AgentSettings]:
        """One settings object per edge, `ssh_host` first: what a one-edge agent dialling that
        edge alone would read (the `extra_edges` entry's fields over the agent's own)."""
        first = self.model_copy(update={"extra_edges": []})
        return [first] + [
            first.model_copy(
                update={
                    "ssh_host": target.host,
                    "ssh_port": target.port,
                    "ssh_user": target.user or self.ssh_user,
                    "known_hosts": target.known_hosts or self.known_hosts,
                    "remote_bind": target.remote_bind or self.remote_bind,
                }
            )
            for target in self.extra_edges
        ]

    @property
    def model_server_address(self) -> tuple[str, int]:
        """The host and port of the model server, where the forward ends on this machine."""
        return url_address(self.upstream)
