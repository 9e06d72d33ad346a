"""The systemd units: the directives the design relies on, and `systemd-analyze verify`."""

from __future__ import annotations

import configparser
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

UNITS = Path(__file__).resolve().parent.parent / "systemd"
NAMES = ("backhaul-agent.service", "backhaul-edge.service")
INSTALLED_BIN = "/opt/backhaul/.venv/bin"  # where docs/deploy.md installs the programs


def parse(name: str) -> configparser.ConfigParser:
    unit = configparser.ConfigParser(strict=False, interpolation=None, delimiters=("=",))
    unit.optionxform = str  # type: ignore[assignment,method-assign]
    unit.read_string((UNITS / name).read_text())
    return unit


@pytest.mark.parametrize("name", NAMES)
def test_unit_has_the_directives_the_design_relies_on(name: str):
    unit = parse(name)
    service = unit["Service"]
    assert service["Type"] == "notify"
    assert service["Restart"] == "on-failure"
    assert service["WatchdogSec"]
    assert service["DynamicUser"] == "yes"
    for hardening in ("NoNewPrivileges", "ProtectHome", "PrivateTmp"):
        assert service[hardening] == "yes", hardening
    assert service["ProtectSystem"] == "strict"
    assert service["StateDirectory"]
    assert service["ConfigurationDirectory"] == "backhaul"
    assert unit["Unit"]["After"] == "network-online.target"
    assert unit["Unit"]["Wants"] == "network-online.target"
    assert service["ExecStart"].startswith(INSTALLED_BIN)
    # systemd's default soft limit (1,024) let one client exhaust the edge's descriptors.
    assert int(service["LimitNOFILE"]) >= 65536


def test_agent_unit_gets_its_key_as_a_credential():
    service = parse("backhaul-agent.service")["Service"]
    assert service["LoadCredential"].startswith("agent_key:")
    assert service["ExecReload"] == "/bin/kill -HUP $MAINPID"


@pytest.mark.skipif(
    shutil.which("systemd-analyze") is None, reason="systemd-analyze is not installed"
)
@pytest.mark.parametrize("name", NAMES)
def test_systemd_analyze_verify(name: str, tmp_path: Path):
    # verify insists ExecStart exists: point it at this checkout's programs.
    here = str(Path(sys.executable).parent)
    (tmp_path / name).write_text((UNITS / name).read_text().replace(INSTALLED_BIN, here))
    result = subprocess.run(
        ["systemd-analyze", "verify", str(tmp_path / name)],
        capture_output=True,
        text=True,
        check=False,
        timeout=60,
    )
    # verify exits 0 on unknown keys and bad values: any message at all is a failure.
    assert result.returncode == 0, result.stderr
    assert result.stderr.strip() == "", result.stderr
