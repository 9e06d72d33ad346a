"""`backhaul-agent service`: what it writes for systemd, launchd and WinSW, each checked by the
tool that reads it where that tool is here (plistlib, xml.etree, `systemd-analyze verify`), the
commands it runs, and what it says on a machine without a service manager to install into.

Only Linux runs here: the macOS and Windows definitions are rendered on it (the OS is a
parameter), and nothing was run by launchd or a Windows service manager (docs/workstation.md).
"""

from __future__ import annotations

import os
import plistlib
import shutil
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path, PurePath, PureWindowsPath

import pytest

from agent import platforms, service_linux, service_macos, service_windows
from agent.service import NAME, Copy, Run, Write, make_target
from agent.status import STATUS_FILE, StatusBoard
from tests.test_systemd_units import INSTALLED_BIN, UNITS

AGENT = str(Path(sys.executable).parent / "backhaul-agent")
SYSTEMD_RUNNING = Path("/run/systemd/system").is_dir()
WINDOWS_VENV = PureWindowsPath(r"C:\Users\alice\backhaul\.venv\Scripts")


def _cli(*args: str, home: Path | None = None) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, **({"HOME": str(home)} if home else {})}
    return subprocess.run(
        [AGENT, "service", *args], capture_output=True, text=True, env=env, timeout=60
    )


def _seconds(delay: str) -> int:
    number, unit = delay.split()
    return int(number) * {"sec": 1, "min": 60}[unit]


# --- macOS -------------------------------------------------------------------------------


@pytest.mark.parametrize("user", [True, False], ids=["LaunchAgent", "LaunchDaemon"])
def test_the_launchd_plist_parses_and_has_the_keys(user: bool):
    t = make_target(
        platforms.MACOS,
        user=user,
        bin_dir=PurePath("/Users/alice/backhaul/.venv/bin"),
        home=PurePath("/Users/alice"),
        uid=501,
    )
    job = plistlib.loads(service_macos.render_plist(t).encode())
    assert job["Label"] == service_macos.LABEL
    assert job["ProgramArguments"] == [
        "/Users/alice/backhaul/.venv/bin/backhaul-agent",
        "run",
        "--config",
        str(t.config),
    ]
    assert job["RunAtLoad"] is True
    assert job["KeepAlive"] == {"SuccessfulExit": False}
    assert job["ThrottleInterval"] == 5
    assert job["ExitTimeOut"] == 30
    assert job["ProcessType"] == "Interactive"
    library = "/Users/alice/Library" if user else "/Library"
    assert job["StandardOutPath"] == job["StandardErrorPath"] == f"{library}/Logs/{NAME}.log"
    assert str(t.config) == f"{library}/Application Support/backhaul/agent.toml"
    assert job["EnvironmentVariables"]["BACKHAUL_AGENT_STATE_DIR"] == str(t.config.parent / "state")
    folder = "LaunchAgents" if user else "LaunchDaemons"
    assert str(service_macos.plist_path(t)) == f"{library}/{folder}/{service_macos.LABEL}.plist"


def test_launchd_install_bootstraps_in_the_right_domain_and_falls_back_to_load():
    for user, domain in ((True, "gui/501"), (False, "system")):
        t = make_target(platforms.MACOS, user=user, home=PurePath("/Users/alice"), uid=501)
        runs = [a for a in service_macos.install(t).actions if isinstance(a, Run)]
        bootstrap = next(r for r in runs if r.argv[:2] == ("launchctl", "bootstrap"))
        assert bootstrap.argv[2] == domain
        assert bootstrap.fallback == ("launchctl", "load", "-w", str(service_macos.plist_path(t)))
        assert runs[-1].argv == ("launchctl", "kickstart", "-k", f"{domain}/{service_macos.LABEL}")


# --- Windows -----------------------------------------------------------------------------


def test_the_winsw_xml_parses_and_has_the_elements():
    t = make_target(
        platforms.WINDOWS,
        bin_dir=WINDOWS_VENV,
        config=PureWindowsPath(r"C:\ProgramData\backhaul\agent.toml"),
    )
    root = ET.fromstring(service_windows.render_xml(t))  # noqa: S314 (our own output)
    assert root.tag == "service"
    assert root.findtext("id") == NAME
    assert root.findtext("executable") == str(WINDOWS_VENV / "backhaul-agent.exe")
    assert root.findtext("arguments") == r'run --config "C:\ProgramData\backhaul\agent.toml"'
    assert root.findtext("startmode") == "Automatic"
    assert root.findtext("delayedAutoStart") == "true"
    assert root.findtext("resetfailure") == "1 day"
    assert root.findtext("logpath") == r"C:\ProgramData\backhaul\logs"
    failures = root.findall("onfailure")
    assert {f.get("action") for f in failures} == {"restart"}
    delays = [_seconds(f.get("delay", "")) for f in failures]
    assert len(delays) >= 2 and delays == sorted(set(delays)), delays  # growing
    env = {e.get("name"): e.get("value") for e in root.findall("env")}
    assert env["BACKHAUL_AGENT_STATE_DIR"] == r"C:\ProgramData\backhaul\state"
    log = root.find("log")
    assert log is not None and log.get("mode") == "roll-by-size"


def test_winsw_install_copies_the_exe_then_installs_and_starts(tmp_path: Path):
    exe = tmp_path / "WinSW-x64.exe"
    t = make_target(platforms.WINDOWS, bin_dir=WINDOWS_VENV, winsw=exe)
    actions = service_windows.install(t).actions
    wrapper = str(service_windows.wrapper(t))
    assert actions[0] == Copy(exe, service_windows.wrapper(t))
    assert isinstance(actions[1], Write) and actions[1].path.name == f"{NAME}.xml"
    assert actions[1].path.parent == service_windows.wrapper(t).parent  # WinSW finds it by name
    runs = [a.argv for a in actions if isinstance(a, Run)]
    assert runs[-2:] == [(wrapper, "install"), (wrapper, "start")]


# --- Linux -------------------------------------------------------------------------------


def test_the_system_unit_is_the_repository_unit_pointed_at_this_venv():
    t = make_target(platforms.LINUX, config=PurePath("/etc/backhaul/agent.toml"))
    rendered = service_linux.render_unit(t).splitlines()
    repo = (UNITS / f"{NAME}.service").read_text().splitlines()
    assert rendered[0].startswith("# Written by")
    exec_start = (
        f"ExecStart={Path(sys.executable).parent}/{NAME} run --config /etc/backhaul/agent.toml"
    )
    assert rendered[1:] == [exec_start if line.startswith("ExecStart=") else line for line in repo]
    assert repo.count(f"ExecStart={INSTALLED_BIN}/{NAME} run") == 1


def test_a_venv_under_home_keeps_home_readable_for_the_system_unit():
    t = make_target(platforms.LINUX, bin_dir=PurePath("/home/alice/.venv/bin"))
    unit = service_linux.render_unit(t)
    assert "ProtectHome=read-only" in unit.splitlines()
    assert "ProtectHome=yes" not in unit


def test_the_user_unit_drops_what_a_user_manager_cannot_do(tmp_path: Path):
    t = make_target(platforms.LINUX, user=True, home=tmp_path)
    keys = {line.split("=", 1)[0] for line in service_linux.render_unit(t).splitlines()}
    assert not keys & {"DynamicUser", "LoadCredential", "ProtectSystem", "PrivateDevices"}
    assert "WantedBy=default.target" in service_linux.render_unit(t)
    assert str(service_linux.unit_path(t)) == f"{tmp_path}/.config/systemd/user/{NAME}.service"
    assert str(t.config) == f"{tmp_path}/.config/backhaul/agent.toml"


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="systemd-analyze is missing")
@pytest.mark.parametrize("user", [False, True], ids=["system", "user"])
def test_the_generated_unit_passes_systemd_analyze_verify(user: bool, tmp_path: Path):
    t = make_target(platforms.LINUX, user=user, home=tmp_path)
    path = tmp_path / f"{NAME}.service"
    path.write_text(service_linux.render_unit(t))
    runtime = tmp_path / "runtime"  # a user manager's XDG_RUNTIME_DIR, for --user
    runtime.mkdir(mode=0o700)
    result = subprocess.run(
        ["systemd-analyze", *(["--user"] if user else []), "verify", str(path)],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "XDG_RUNTIME_DIR": str(runtime)},
    )
    # verify exits 0 on unknown keys and bad values: any message at all is a failure.
    assert result.returncode == 0, result.stderr
    assert result.stderr.strip() == "", result.stderr


# --- the command line --------------------------------------------------------------------


@pytest.mark.parametrize(
    ("system", "written", "command"),
    [
        ("linux", f"/etc/systemd/system/{NAME}.service", "systemctl enable --now"),
        ("darwin", "/Library/LaunchDaemons/net.backhaul.agent.plist", "launchctl bootstrap system"),
        ("win32", rf"\backhaul\service\{NAME}.xml", rf"\service\{NAME}.exe install"),
    ],
)
def test_install_dry_run_prints_the_file_and_the_commands(system: str, written: str, command: str):
    result = _cli("install", "--dry-run", "--os", system)
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert "# write " in out and written in out
    assert "# run: " in out and command in out
    removed = _cli("uninstall", "--dry-run", "--os", system)
    assert removed.returncode == 0, removed.stderr
    assert "# remove " in removed.stdout


def test_another_os_is_rendered_only(tmp_path: Path):
    result = _cli("install", "--os", "win32")
    assert result.returncode == 2
    assert "--dry-run" in result.stderr


def test_windows_has_no_user_services():
    result = _cli("install", "--dry-run", "--os", "win32", "--user")
    assert result.returncode == 2
    assert "machine-wide" in result.stderr


@pytest.mark.skipif(SYSTEMD_RUNNING, reason="systemd runs here: the install would be real")
def test_install_without_systemd_says_so_and_changes_nothing(tmp_path: Path):
    config = tmp_path / ".config" / "backhaul" / "agent.toml"
    config.parent.mkdir(parents=True)
    config.write_text('ssh_host = "vps.example.net"\n')
    result = _cli("install", "--user", home=tmp_path)
    assert result.returncode == 3, result.stderr
    assert "systemd is not running on this machine" in result.stderr
    assert "nothing was changed" in result.stderr
    assert not (tmp_path / ".config" / "systemd").exists()


def test_install_refuses_without_a_settings_file(tmp_path: Path):
    result = _cli("install", "--user", home=tmp_path)
    assert result.returncode == 2
    assert f"no settings file at {tmp_path}/.config/backhaul/agent.toml" in result.stderr


def test_service_status_reads_the_units_state_directory(tmp_path: Path):
    state = tmp_path / ".local" / "state" / NAME
    state.mkdir(parents=True)
    board = StatusBoard(state / STATUS_FILE, vps="vps.example.net:2222", upstream="http://x")
    board.model_server_up("ollama", "0.12.0")  # pid: this test's process, which is running
    result = _cli("status", "--user", home=tmp_path)
    lines = result.stdout.splitlines()
    if SYSTEMD_RUNNING:
        assert lines[0].startswith("service      NOT INSTALLED")
    else:
        assert lines[0].startswith("service      unknown (no service manager")
    assert any(line.startswith("tunnel       DOWN to vps.example.net:2222") for line in lines)
    assert result.returncode == 1  # as `backhaul-agent status`: running, the tunnel down
