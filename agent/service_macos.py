"""The agent as a launchd job: a LaunchDaemon as root (at boot), else a LaunchAgent (at login).

The keys, and why (launchd.plist(5); research: turn2-scale-anchors.md §4.3):
- `RunAtLoad`, and `KeepAlive {SuccessfulExit: false}`: started when loaded, started again after a
  crash or a failed start, but not after the clean exit 0 that a stop (SIGTERM) ends in;
- `ThrottleInterval` 5: a failing start is retried every 5 s, not launchd's 10;
- `ExitTimeOut` 30: the SIGKILL comes 30 s after SIGTERM, well past the agent's one-second exit;
- `ProcessType Interactive`: without it launchd throttles the job's CPU and I/O, and every
  streamed token crosses this process;
- `ProgramArguments`: the venv's `backhaul-agent` by absolute path; `WorkingDirectory` the
  settings file's folder, so relative key paths there are beside it;
- the log (stderr, one JSON object a line) in ~/Library/Logs, or /Library/Logs for the daemon.

Loaded with `launchctl bootstrap system|gui/<uid>` and `kickstart -k` (the current verbs since
macOS 10.10), falling back to the legacy `launchctl load -w` where bootstrap fails.
"""

from __future__ import annotations

import plistlib
import shutil
import subprocess
from pathlib import PurePath

from agent import platforms
from agent.service import NAME, Plan, Query, Remove, Run, Target, Write

LABEL = "net.backhaul.agent"
THROTTLE_S = 5
EXIT_TIMEOUT_S = 30


def _library(t: Target) -> PurePath:
    return t.home / "Library" if t.user else PurePath("/Library")


def default_config(t: Target) -> PurePath:
    return _library(t) / "Application Support" / "backhaul" / "agent.toml"


def state_dir(t: Target) -> PurePath:
    return t.config.parent / "state"


def log_path(t: Target) -> PurePath:
    return _library(t) / "Logs" / f"{NAME}.log"


def plist_path(t: Target) -> PurePath:
    folder = "LaunchAgents" if t.user else "LaunchDaemons"
    return _library(t) / folder / f"{LABEL}.plist"


def _domain(t: Target) -> str:
    return f"gui/{t.uid}" if t.user else "system"


def job(t: Target) -> dict[str, object]:
    """The launchd job, as a dictionary (`render_plist` writes it)."""
    return {
        "Label": LABEL,
        "ProgramArguments": [str(t.agent), "run", "--config", str(t.config)],
        "WorkingDirectory": str(t.config.parent),
        "EnvironmentVariables": {
            "BACKHAUL_AGENT_STATE_DIR": str(state_dir(t)),
            "BACKHAUL_AGENT_LOG_FORMAT": "json",
        },
        "RunAtLoad": True,
        "KeepAlive": {"SuccessfulExit": False},
        "ThrottleInterval": THROTTLE_S,
        "ExitTimeOut": EXIT_TIMEOUT_S,
        "ProcessType": "Interactive",
        "StandardOutPath": str(log_path(t)),
        "StandardErrorPath": str(log_path(t)),
    }


def render_plist(t: Target) -> str:
    return plistlib.dumps(job(t), sort_keys=False).decode()


def install(t: Target) -> Plan:
    domain, plist = _domain(t), str(plist_path(t))
    service = f"{domain}/{LABEL}"
    when = "at login (a LaunchAgent)" if t.user else "at boot (a LaunchDaemon)"
    return Plan(
        (
            Write(plist_path(t), render_plist(t)),
            # A job loaded before (a reinstall) must go first, or bootstrap refuses.
            Run(("launchctl", "bootout", service), may_fail=True),
            # A job disabled before (`launchctl disable`, Login Items) will not bootstrap.
            Run(("launchctl", "enable", service), may_fail=True),
            Run(
                ("launchctl", "bootstrap", domain, plist),
                fallback=("launchctl", "load", "-w", plist),
            ),
            Run(("launchctl", "kickstart", "-k", service)),
        ),
        (
            f"starts {when}; its log: {log_path(t)}",
            f"the agent's state (what `{NAME} status` reads): {state_dir(t)}",
            "macOS 13+ lists it under System Settings > General > Login Items, where it can be "
            "switched off",
        ),
    )


def uninstall(t: Target) -> Plan:
    plist = str(plist_path(t))
    return Plan(
        (
            Run(
                ("launchctl", "bootout", f"{_domain(t)}/{LABEL}"),
                fallback=("launchctl", "unload", "-w", plist),
                may_fail=True,
            ),
            Remove(plist_path(t)),
        )
    )


def unavailable(t: Target, installing: bool) -> str | None:
    if shutil.which("launchctl") is None:
        return "launchctl is not on this machine: launchd jobs are for macOS"
    if not t.user and not platforms.is_root():
        return "a LaunchDaemon needs root: run it with sudo, or add --user for a LaunchAgent"
    return None


def query(t: Target) -> Query | None:
    if shutil.which("launchctl") is None:
        return None
    service = f"{_domain(t)}/{LABEL}"
    argv = ("launchctl", "print", service)
    done = subprocess.run(argv, capture_output=True, text=True, check=False)  # noqa: S603 (our argv, no shell)
    if done.returncode != 0:
        return Query(False, False, f"launchctl print {service}: not loaded")
    running = "state = running" in done.stdout
    return Query(True, running, f"{service} {'running' if running else 'loaded, not running'}")
