"""The agent as a Windows service, run by WinSW 2.12.0: an XML file beside its exe.

Why WinSW (research: turn2-scale-anchors.md §4.4): a service must be a program that answers the
Service Control Manager, which a Python console program is not. pywin32's host
(`pythonservice.exe`) started from a virtualenv often fails with error 1053 because the SYSTEM
account cannot find the venv's DLLs (pywin32#1451, #1455, #1987, #2056); NSSM's last release is
from 2014; Task Scheduler kills a task after 72 h unless told otherwise and shows no service
state. WinSW 2.12.0 is the stable line (3.0 is still alpha and fails on some Windows 11 hosts)
and runs the venv's own `backhaul-agent.exe` as a plain child process: it stops it with Ctrl+C
(SIGINT to the agent, which closes its connections and exits 0) and kills it only after
`stoptimeout`. The exe cannot be downloaded here; `install --winsw PATH` copies the one you got.

The service starts automatically (delayed, after the network is up at boot), runs as LocalSystem,
and restarts the agent after a failure with growing delays (5 s, 20 s, then every 60 s; the count
resets after a day without one). Its log (the agent's stderr, one JSON object a line) rolls by
size under %ProgramData%\\backhaul\\logs.
"""

from __future__ import annotations

import ctypes
import shutil
import subprocess
import xml.etree.ElementTree as ET
from pathlib import Path, PurePath

from agent import platforms
from agent.service import NAME, Copy, Plan, Query, Remove, Run, Target, Write

WINSW_VERSION = "2.12.0"
WINSW_RELEASE = "https://github.com/winsw/winsw/releases/tag/v2.12.0"
# The self-contained 64-bit build: no .NET Framework to match (users pick the wrong .NET build).
WINSW_ASSET = "WinSW-x64.exe"
RESTART_DELAYS = ("5 sec", "20 sec", "60 sec")  # the last one repeats
RESET_FAILURE = "1 day"
STOP_TIMEOUT = "15 sec"  # Ctrl+C, then this long before WinSW kills the agent
LOG_ROLL_KB, LOG_KEEP = 10240, 8
_NOT_INSTALLED = 1060  # sc.exe: ERROR_SERVICE_DOES_NOT_EXIST


def _home(t: Target) -> PurePath:
    return t.config.parent


def default_config(t: Target) -> PurePath:
    return platforms.default_config_file(platforms.WINDOWS)


def state_dir(t: Target) -> PurePath:
    return _home(t) / "state"


def service_dir(t: Target) -> PurePath:
    return _home(t) / "service"


def wrapper(t: Target) -> PurePath:
    """WinSW's exe, renamed to the service's id: it finds its XML by its own name."""
    return service_dir(t) / f"{NAME}.exe"


def log_dir(t: Target) -> PurePath:
    return _home(t) / "logs"


def render_xml(t: Target) -> str:
    """WinSW's configuration for `t` (its 2.x schema)."""
    root = ET.Element("service")
    for tag, text in (
        ("id", NAME),
        ("name", "backhaul agent"),
        ("description", "backhaul agent: the SSH reverse tunnel to the VPS edge"),
        ("executable", str(t.agent)),
        ("arguments", f'run --config "{t.config}"'),
        ("workingdirectory", str(_home(t))),
        ("startmode", "Automatic"),
        ("delayedAutoStart", "true"),
        ("stoptimeout", STOP_TIMEOUT),
        ("resetfailure", RESET_FAILURE),
        ("logpath", str(log_dir(t))),
    ):
        ET.SubElement(root, tag).text = text
    for delay in RESTART_DELAYS:
        ET.SubElement(root, "onfailure", action="restart", delay=delay)
    for name, value in (
        ("BACKHAUL_AGENT_STATE_DIR", str(state_dir(t))),
        ("BACKHAUL_AGENT_LOG_FORMAT", "json"),
    ):
        ET.SubElement(root, "env", name=name, value=value)
    log = ET.SubElement(root, "log", mode="roll-by-size")
    ET.SubElement(log, "sizeThreshold").text = str(LOG_ROLL_KB)
    ET.SubElement(log, "keepFiles").text = str(LOG_KEEP)
    ET.indent(root)
    return ET.tostring(root, encoding="unicode", xml_declaration=True) + "\n"


def install(t: Target) -> Plan:
    exe = str(wrapper(t))
    copy: tuple[Copy, ...] = ()
    if t.winsw is not None:
        copy = (Copy(t.winsw, wrapper(t)),)
    return Plan(
        (
            *copy,
            Write(service_dir(t) / f"{NAME}.xml", render_xml(t)),
            # A service installed before (a reinstall) is replaced by the new definition.
            Run((exe, "stop"), may_fail=True),
            Run((exe, "uninstall"), may_fail=True),
            Run((exe, "install")),
            Run((exe, "start")),
        ),
        (
            f"WinSW {WINSW_VERSION} ({WINSW_ASSET} from {WINSW_RELEASE}) must be at {exe}, "
            "or named with --winsw",
            f"the agent's log: {log_dir(t) / f'{NAME}.err.log'}",
            f"the agent's state (what `{NAME} status` reads): {state_dir(t)}",
        ),
    )


def uninstall(t: Target) -> Plan:
    exe = str(wrapper(t))
    return Plan(
        (
            Run((exe, "stop"), may_fail=True),
            Run((exe, "uninstall")),
            Remove(service_dir(t) / f"{NAME}.xml"),
        ),
        (f"{exe} and the logs in {log_dir(t)} are left in place",),
    )


def unavailable(t: Target, installing: bool) -> str | None:
    if platforms.current() != platforms.WINDOWS:
        return "WinSW services are for Windows"
    have = t.winsw is not None or Path(wrapper(t)).is_file()
    if installing and not have:
        return (
            f"WinSW is needed to run the agent as a service, and is not at {wrapper(t)}. "
            f"Download {WINSW_ASSET} (version {WINSW_VERSION}) from {WINSW_RELEASE} and run "
            "this again with --winsw PATH-TO-IT (docs/workstation.md)"
        )
    if not _is_admin():
        return "installing a service needs an elevated PowerShell (Run as administrator)"
    return None


def _is_admin() -> bool:  # pragma: no cover - runs on Windows only
    shell32 = ctypes.windll.shell32  # type: ignore[attr-defined,unused-ignore]
    return bool(shell32.IsUserAnAdmin())


def query(t: Target) -> Query | None:
    if shutil.which("sc.exe") is None:
        return None
    argv = ("sc.exe", "query", NAME)
    done = subprocess.run(argv, capture_output=True, text=True, check=False)  # noqa: S603 (our argv, no shell)
    if done.returncode == _NOT_INSTALLED:
        return Query(False, False, f"sc.exe query {NAME}: no such service")
    state = next(
        (ln.split(":", 1)[1].strip() for ln in done.stdout.splitlines() if "STATE" in ln), "?"
    )
    return Query(True, "RUNNING" in state, f"sc.exe query {NAME}: {state}")
