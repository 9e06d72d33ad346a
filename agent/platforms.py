"""What differs for the agent between Linux, macOS and Windows, in one place.

The agent runs on the workstation, and most home GPUs sit in Windows desktops and Macs. The
edge stays Linux-only; everything here is the agent's: where its files live by default, how the
private key is kept readable by its owner alone, and how `status` asks whether a process lives.
Each function takes the OS as `system` (`sys.platform`'s spelling: linux, darwin, win32), so a
Linux machine can render and test what the other two would do.

Where the defaults live (`%ProgramData%` on Windows is machine-wide, as its service is; a macOS
LaunchDaemon, installed as root, reads the machine-wide folder, a LaunchAgent the user's):

- Linux: /etc/backhaul/agent.toml, state in /var/lib/backhaul-agent (the unit's StateDirectory);
- macOS: ~/Library/Application Support/backhaul/agent.toml (root: /Library/...), state beside it;
- Windows: %ProgramData%\\backhaul\\agent.toml, state in %ProgramData%\\backhaul\\state.
"""

from __future__ import annotations

import ctypes
import getpass
import os
import subprocess
import sys
from pathlib import Path, PurePath, PureWindowsPath

LINUX, MACOS, WINDOWS = "linux", "darwin", "win32"
SYSTEMS = (LINUX, MACOS, WINDOWS)

# Well-known SIDs, not names: "SYSTEM" and "Administrators" are translated on other locales.
_SYSTEM_SID, _ADMINISTRATORS_SID = "*S-1-5-18", "*S-1-5-32-544"


def current() -> str:
    """This machine's OS, as one of `SYSTEMS` (any other Unix counts as Linux)."""
    if sys.platform.startswith("win"):
        return WINDOWS
    return MACOS if sys.platform == "darwin" else LINUX


def is_root() -> bool:
    """Running as root (POSIX); on Windows, never: services there are not told apart by uid."""
    geteuid = getattr(os, "geteuid", None)
    return geteuid is not None and geteuid() == 0


def program_data() -> PureWindowsPath:
    """Windows' machine-wide data folder (`%ProgramData%`, C:\\ProgramData unless moved)."""
    return PureWindowsPath(os.environ.get("PROGRAMDATA", r"C:\ProgramData"))


def base_dir(system: str | None = None, *, root: bool | None = None) -> PurePath:
    """Where the agent's config lives on `system` (None: this one); macOS: per user unless
    `root` (None: whether this process is root), since a LaunchDaemon is machine-wide."""
    system = system or current()
    if system == WINDOWS:
        return program_data() / "backhaul"
    if system == MACOS:
        machine = is_root() if root is None else root
        home = Path("/") if machine else Path.home()
        return home / "Library" / "Application Support" / "backhaul"
    return Path("/etc/backhaul")


def default_config_file(system: str | None = None) -> PurePath:
    return base_dir(system) / "agent.toml"


def default_state_dir(system: str | None = None) -> PurePath:
    system = system or current()
    if system == LINUX:
        return Path("/var/lib/backhaul-agent")  # the unit's StateDirectory
    return base_dir(system) / "state"


def key_acl_command(path: PurePath, user: str | None = None) -> list[str]:
    """The `icacls` command that leaves the Windows key file readable only by `user` (this one),
    SYSTEM (the service) and Administrators: inherited entries removed, each granted anew."""
    who = user or getpass.getuser()
    grants = [f"{who}:F", f"{_SYSTEM_SID}:F", f"{_ADMINISTRATORS_SID}:F"]
    return ["icacls", str(path), "/inheritance:r", "/grant:r", *grants]


def protect_private_key(path: Path, system: str | None = None) -> None:
    """Make `path` readable by its owner alone: mode 0600 on POSIX, an ACL on Windows.

    Error handling: an `OSError` (or a failed `icacls`, as `CalledProcessError`) propagates:
    a private key left readable by others must not pass silently.
    """
    if (system or current()) == WINDOWS:
        subprocess.run(key_acl_command(path), check=True, capture_output=True)  # noqa: S603 (our argv, no shell)
    else:
        os.chmod(path, 0o600)


def pid_alive(pid: int) -> bool:
    """Whether process `pid` exists (another user's counts). On Windows `os.kill(pid, 0)`
    would end it (it calls TerminateProcess), so the process is opened and asked instead."""
    if current() == WINDOWS:
        return _windows_pid_alive(pid)
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # it exists, under another user (DynamicUser)
        return True
    return True


def _windows_pid_alive(pid: int) -> bool:  # pragma: no cover - runs on Windows only
    query_limited_information, still_active = 0x1000, 259
    kernel32 = ctypes.windll.kernel32  # type: ignore[attr-defined,unused-ignore]
    handle = kernel32.OpenProcess(query_limited_information, False, pid)
    if not handle:
        return False
    try:
        code = ctypes.c_ulong()
        return bool(kernel32.GetExitCodeProcess(handle, ctypes.byref(code))) and (
            code.value == still_active
        )
    finally:
        kernel32.CloseHandle(handle)
