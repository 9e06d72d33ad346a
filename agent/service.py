"""`backhaul-agent service install | uninstall | status`: the agent as the OS's own service.

cloudflared, tailscale and ngrok each install themselves with one command; so does the agent,
on the three systems a GPU workstation runs:

- Linux: the systemd unit (systemd/backhaul-agent.service, ExecStart pointed at this virtualenv),
  `systemctl enable --now`; `--user` for a user unit (~/.config/systemd/user).
- macOS: a LaunchDaemon (/Library/LaunchDaemons) as root, else a LaunchAgent
  (~/Library/LaunchAgents), loaded with `launchctl bootstrap`.
- Windows: a service run by WinSW 2.12 (an XML file beside its exe), which starts at boot and
  restarts the agent with growing delays. Not pywin32: its services started from a virtualenv
  fail with error 1053 (the SYSTEM account cannot find the venv's DLLs), and WinSW runs the
  venv's own `backhaul-agent.exe` as a plain console program that Ctrl+C stops cleanly.

Every change is a list of `Action`s built by the OS's module (`agent.service_linux`, `_macos`,
`_windows`) from a `Target`: what to write, run and remove. `--dry-run` prints them instead of
doing them, and `--os` renders another system's (with `--dry-run` only), so all three are
rendered and tested on Linux. `status` asks the service manager whether the service is installed
and running, then prints what `backhaul-agent status` prints, from the same state file.

Exit statuses: 0 done, 1 a command failed, 2 a usage or settings error, 3 the service manager is
not there to use (no systemd running, no WinSW exe, no administrator rights); `status` exits as
`backhaul-agent status` does.
"""

from __future__ import annotations

import argparse
import getpass
import os
import shutil
import subprocess
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path, PurePath, PureWindowsPath
from typing import Protocol

from agent import platforms, status_cmd
from shared.cli import Subparsers, add_command

NAME = "backhaul-agent"  # the unit, the launchd job's file, the Windows service's id
EXIT_DONE, EXIT_FAILED, EXIT_USAGE, EXIT_UNAVAILABLE = 0, 1, 2, 3


@dataclass(frozen=True)
class Target:
    """Where and for whom the service is installed; every OS module reads only this."""

    system: str  # platforms.LINUX, MACOS or WINDOWS
    user: bool  # a per-user service (systemd --user, a LaunchAgent)
    bin_dir: PurePath  # the virtualenv's scripts folder, where `backhaul-agent` is
    config: PurePath  # the TOML file the service runs with
    home: PurePath
    uid: int  # launchd's gui/<uid> domain
    winsw: Path | None = None  # the downloaded WinSW exe (Windows)

    @property
    def agent(self) -> PurePath:
        """The venv's `backhaul-agent` program, by absolute path (never from PATH)."""
        suffix = ".exe" if self.system == platforms.WINDOWS else ""
        return self.bin_dir / f"{NAME}{suffix}"


@dataclass(frozen=True)
class Write:
    path: PurePath
    text: str


@dataclass(frozen=True)
class Copy:
    source: PurePath
    path: PurePath


@dataclass(frozen=True)
class Remove:
    path: PurePath


@dataclass(frozen=True)
class Run:
    """A command; `fallback` runs when it fails (an older tool), `may_fail` ignores failure."""

    argv: tuple[str, ...]
    fallback: tuple[str, ...] | None = None
    may_fail: bool = False


Action = Write | Copy | Remove | Run


@dataclass(frozen=True)
class Plan:
    actions: tuple[Action, ...]
    notes: tuple[str, ...] = field(default=())


@dataclass(frozen=True)
class Query:
    """What the service manager said: installed? running? in its own words."""

    installed: bool
    running: bool
    detail: str


class Backend(Protocol):
    """One OS's service manager (agent.service_linux, _macos, _windows)."""

    def default_config(self, t: Target) -> PurePath: ...
    def state_dir(self, t: Target) -> PurePath: ...
    def install(self, t: Target) -> Plan: ...
    def uninstall(self, t: Target) -> Plan: ...
    def unavailable(self, t: Target, installing: bool) -> str | None: ...
    def query(self, t: Target) -> Query | None: ...


def backend(system: str) -> Backend:
    # Imported here: each of them imports this module's types.
    from agent import service_linux, service_macos, service_windows

    modules: dict[str, Backend] = {
        platforms.LINUX: service_linux,
        platforms.MACOS: service_macos,
        platforms.WINDOWS: service_windows,
    }
    return modules[system]


def make_target(
    system: str,
    *,
    user: bool = False,
    config: PurePath | None = None,
    bin_dir: PurePath | None = None,
    home: PurePath | None = None,
    uid: int | None = None,
    winsw: Path | None = None,
) -> Target:
    """A `Target` on `system`, this process's venv, home and uid unless given; the config file
    is the OS's default for a machine-wide or per-user service unless given."""
    path_type = PureWindowsPath if system == platforms.WINDOWS else PurePath
    if bin_dir is None:
        here = Path(os.path.abspath(sys.executable)).parent  # not resolved: the venv's own
        if system == platforms.current():
            bin_dir = here
        else:  # rendered for another system: this venv laid out as there
            scripts = "Scripts" if system == platforms.WINDOWS else "bin"
            bin_dir = path_type(here.parent) / scripts
    t = Target(
        system=system,
        user=user,
        bin_dir=bin_dir,
        config=path_type("."),
        home=home or Path.home(),
        uid=uid if uid is not None else getattr(os, "getuid", lambda: 0)(),
        winsw=winsw,
    )
    chosen = config or backend(system).default_config(t)
    if system == platforms.current():
        chosen = Path(os.path.abspath(chosen))
    return Target(**{**t.__dict__, "config": chosen})


def render(plan: Plan) -> str:
    """The plan as `--dry-run` prints it: each file in full, each command as typed."""
    out: list[str] = []
    for action in plan.actions:
        match action:
            case Write(path, text):
                out += [f"# write {path}", text.rstrip("\n"), f"# end of {path}"]
            case Copy(source, path):
                out.append(f"# copy {source} to {path}")
            case Remove(path):
                out.append(f"# remove {path}")
            case Run(argv, fallback, _):
                out.append(f"# run: {_shell(argv)}")
                if fallback is not None:
                    out.append(f"#   if that fails: {_shell(fallback)}")
    out += [f"# note: {note}" for note in plan.notes]
    return "\n".join(out) + "\n"


def _shell(argv: Sequence[str]) -> str:
    return " ".join(f'"{a}"' if " " in a else a for a in argv)


def execute(plan: Plan) -> int:
    """Carry the plan out in order; stop at the first command that fails (exit 1)."""
    for action in plan.actions:
        match action:
            case Write(path, text):
                target = Path(path)
                target.parent.mkdir(parents=True, exist_ok=True)
                target.write_text(text, encoding="utf-8")
                print(f"wrote {target}")
            case Copy(source, path):
                Path(path).parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(source, path)
                print(f"copied {source} to {path}")
            case Remove(path):
                Path(path).unlink(missing_ok=True)
                print(f"removed {path}")
            case Run(argv, fallback, may_fail):
                if not _run(argv, quiet=may_fail or fallback is not None):
                    if fallback is not None and _run(fallback, quiet=may_fail):
                        continue
                    if not may_fail:
                        return EXIT_FAILED
    for note in plan.notes:
        print(f"note: {note}")
    return EXIT_DONE


def _run(argv: Sequence[str], *, quiet: bool) -> bool:
    print(f"run: {_shell(argv)}")
    try:
        done = subprocess.run(argv, capture_output=True, text=True, check=False)  # noqa: S603 (our argv, no shell)
    except OSError as exc:
        print(f"  failed: {exc}", file=sys.stderr)
        return False
    if done.returncode != 0 and not quiet:
        said = (done.stderr or done.stdout).strip()
        print(f"  failed (exit {done.returncode}): {said}", file=sys.stderr)
    return done.returncode == 0


def register(subparsers: Subparsers) -> None:
    parser = add_command(
        subparsers, "service", "install, remove or check the agent as a system service", __doc__
    )
    verbs = parser.add_subparsers(dest="verb", required=True, metavar="VERB")
    for verb, summary in (
        ("install", "write the service definition, enable and start it"),
        ("uninstall", "stop and disable the service, remove its definition"),
        ("status", "is the service installed and running; then the agent's own status"),
    ):
        sub = verbs.add_parser(verb, help=summary, description=summary)
        sub.add_argument("--user", action="store_true", help="a per-user service (Linux, macOS)")
        sub.add_argument("--config", type=Path, help="TOML settings file the service runs with")
        if verb != "status":
            sub.add_argument("--dry-run", action="store_true", help="print, change nothing")
            sub.add_argument(
                "--os",
                choices=platforms.SYSTEMS,
                help="render for another system (only with --dry-run)",
            )
        if verb == "install":
            sub.add_argument("--winsw", type=Path, help="Windows: the WinSW 2.12 exe you got")
        sub.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    system = getattr(args, "os", None) or platforms.current()
    dry_run = getattr(args, "dry_run", False)
    if system != platforms.current() and not dry_run:
        print(f"{NAME} service: --os {system} renders only, with --dry-run", file=sys.stderr)
        return EXIT_USAGE
    # macOS: root gets a LaunchDaemon (at boot), anyone else a LaunchAgent (at login).
    user = args.user or (system == platforms.MACOS and not platforms.is_root())
    if user and system == platforms.WINDOWS:
        print(f"{NAME} service: Windows services are machine-wide; no --user", file=sys.stderr)
        return EXIT_USAGE
    t = make_target(system, user=user, config=args.config, winsw=getattr(args, "winsw", None))
    os_backend = backend(system)
    if args.verb == "status":
        return _status(os_backend, t)
    plan = os_backend.install(t) if args.verb == "install" else os_backend.uninstall(t)
    if dry_run:
        sys.stdout.write(render(plan))
        return EXIT_DONE
    if args.verb == "install" and not Path(t.config).is_file():
        print(
            f"{NAME} service: no settings file at {t.config}: write it first "
            "(docs/workstation.md), or name it with --config",
            file=sys.stderr,
        )
        return EXIT_USAGE
    why = os_backend.unavailable(t, installing=args.verb == "install")
    if why is not None:
        print(f"{NAME} service: {why}", file=sys.stderr)
        return EXIT_UNAVAILABLE
    return execute(plan)


def _status(os_backend: Backend, t: Target) -> int:
    found = os_backend.query(t)
    if found is None:
        print(f"service      unknown (no service manager to ask on this machine, as {_me()})")
    elif not found.installed:
        print(f"service      NOT INSTALLED ({found.detail})")
    else:
        state = "running" if found.running else "NOT RUNNING"
        print(f"service      installed, {state} ({found.detail})")
    return status_cmd.report(Path(os_backend.state_dir(t)), as_json=False)


def _me() -> str:
    try:
        return getpass.getuser()
    except (KeyError, OSError):
        return "this user"
