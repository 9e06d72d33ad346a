"""The agent as a systemd service: the repository's unit, pointed at this virtualenv.

The unit is systemd/backhaul-agent.service itself (shipped in the package as
`agent/backhaul-agent.service`), with two changes: `ExecStart` runs this venv's `backhaul-agent
run --config <file>`, and a venv under /home or /root keeps the home directories readable
(`ProtectHome=read-only`: `yes` would hide the program itself).

A `--user` unit (~/.config/systemd/user) runs as the user without root: the sandboxing that needs
privileges or user namespaces (DynamicUser, ProtectSystem, PrivateTmp, the kernel and device
protections, LoadCredential) is left out, the key and known_hosts are whatever the settings file
names (relative paths: beside it, the working directory), and it is wanted by `default.target`.
It runs while the user is logged in, or always after `loginctl enable-linger`.
"""

from __future__ import annotations

import shutil
import subprocess
from importlib import resources
from pathlib import Path, PurePath

from agent import platforms
from agent.service import NAME, Plan, Query, Remove, Run, Target, Write

UNIT = f"{NAME}.service"
SYSTEMD_RUNNING = Path("/run/systemd/system")  # sd_booted(3): how a program knows
_HOMES = ("/home/", "/root/", "/run/user/")
# Directives a user manager cannot apply without privileges (or user namespaces, often off).
_SYSTEM_ONLY = frozenset(
    {
        "DynamicUser",
        "LoadCredential",
        "ProtectSystem",
        "ProtectHome",
        "PrivateTmp",
        "PrivateDevices",
        "ProtectClock",
        "ProtectHostname",
        "ProtectKernelTunables",
        "ProtectKernelModules",
        "ProtectKernelLogs",
        "ProtectControlGroups",
        "ProtectProc",
        "CapabilityBoundingSet",
    }
)
# Files the system unit reads from /etc/backhaul; a user unit takes them from the settings file.
_SYSTEM_PATHS = ("BACKHAUL_AGENT_KEY_PATH=", "BACKHAUL_AGENT_KNOWN_HOSTS=")


def template() -> str:
    return resources.files("agent").joinpath(UNIT).read_text(encoding="utf-8")


def default_config(t: Target) -> PurePath:
    if t.user:
        return t.home / ".config" / "backhaul" / "agent.toml"
    return platforms.default_config_file(platforms.LINUX)


def unit_path(t: Target) -> PurePath:
    if t.user:
        return t.home / ".config" / "systemd" / "user" / UNIT
    return PurePath("/etc/systemd/system") / UNIT


def state_dir(t: Target) -> PurePath:
    """The unit's StateDirectory (%S: /var/lib, or ~/.local/state for a user manager)."""
    if t.user:
        return t.home / ".local" / "state" / NAME
    return platforms.default_state_dir(platforms.LINUX)


def _quote(path: PurePath) -> str:
    return f'"{path}"' if " " in str(path) else str(path)


def render_unit(t: Target) -> str:
    """The unit file for `t`."""
    exec_start = f"ExecStart={_quote(t.agent)} run --config {_quote(t.config)}"
    lines = []
    for line in template().splitlines():
        key = line.split("=", 1)[0]
        if key == "ExecStart":
            line = exec_start
        elif t.user:
            if key in _SYSTEM_ONLY or line.startswith(("Wants=network", "After=network")):
                continue
            if key == "Environment" and line.split("=", 1)[1].startswith(_SYSTEM_PATHS):
                continue
            if key == "WorkingDirectory":
                line = f"WorkingDirectory={_quote(t.config.parent)}"
            if key == "WantedBy":
                line = "WantedBy=default.target"
        elif line == "ProtectHome=yes" and str(t.agent).startswith(_HOMES):
            line = "ProtectHome=read-only"
        lines.append(line)
    head = f"# Written by `{NAME} service install{' --user' if t.user else ''}`."
    return "\n".join([head, *lines]) + "\n"


def _systemctl(t: Target, *args: str) -> tuple[str, ...]:
    return ("systemctl", "--user", *args) if t.user else ("systemctl", *args)


def install(t: Target) -> Plan:
    notes = [f"the agent's state (what `{NAME} status` reads): {state_dir(t)}"]
    if t.user:
        notes.append("to keep it running while you are logged out: loginctl enable-linger")
    else:
        notes.append(
            "the unit reads the key from /etc/backhaul/agent_ed25519_key and the pinned host "
            "key from /etc/backhaul/agent_known_hosts (docs/deploy.md)"
        )
    return Plan(
        (
            Write(unit_path(t), render_unit(t)),
            Run(_systemctl(t, "daemon-reload")),
            Run(_systemctl(t, "enable", "--now", UNIT)),
        ),
        tuple(notes),
    )


def uninstall(t: Target) -> Plan:
    return Plan(
        (
            Run(_systemctl(t, "disable", "--now", UNIT), may_fail=True),
            Remove(unit_path(t)),
            Run(_systemctl(t, "daemon-reload")),
        )
    )


def unavailable(t: Target, installing: bool) -> str | None:
    if not SYSTEMD_RUNNING.is_dir():
        return (
            f"systemd is not running on this machine ({SYSTEMD_RUNNING} is missing): there is "
            "no service manager to install into, and nothing was changed. `--dry-run` prints "
            "the unit to install by hand where systemd runs."
        )
    if not t.user and not platforms.is_root():
        return "a system unit needs root: run it with sudo, or add --user for a user unit"
    return None


def query(t: Target) -> Query | None:
    if shutil.which("systemctl") is None or not SYSTEMD_RUNNING.is_dir():
        return None
    argv = _systemctl(t, "show", UNIT, "-p", "LoadState", "-p", "ActiveState", "-p", "SubState")
    done = subprocess.run(argv, capture_output=True, text=True, check=False)  # noqa: S603 (our argv, no shell)
    fields = dict(line.split("=", 1) for line in done.stdout.splitlines() if "=" in line)
    load = fields.get("LoadState", "unknown")
    active = f"{fields.get('ActiveState', '?')} ({fields.get('SubState', '?')})"
    return Query(load == "loaded", fields.get("ActiveState") == "active", f"{UNIT} {active}")
