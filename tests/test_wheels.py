"""Every dependency of the agent installs from a wheel on Windows and on Apple silicon macOS.

`pip install backhaul` on a workstation must not need a compiler: cryptography, pydantic-core,
orjson, aiohttp's C parts, hiredis, ... each need a wheel for the workstation's platform. The
dependency closure is read from this environment's metadata with each requirement's marker
judged for the target (uvloop is not wanted on Windows), pinned to the versions installed and
tested here, and `pip download --only-binary=:all: --platform ...` fetches them from the package
index. It needs the index: without it the test is skipped, except in CI (`CI` set), where it
must run.
"""

from __future__ import annotations

import os
import subprocess
import sys
from importlib import metadata
from pathlib import Path
from typing import cast

import pytest
from packaging.markers import default_environment
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

pytestmark = pytest.mark.wheels

# What each target's environment markers read (PEP 508), for the marker judged per platform.
TARGETS = {
    "win_amd64": {
        "sys_platform": "win32",
        "platform_system": "Windows",
        "os_name": "nt",
        "platform_machine": "AMD64",
    },
    "macosx_11_0_arm64": {
        "sys_platform": "darwin",
        "platform_system": "Darwin",
        "os_name": "posix",
        "platform_machine": "arm64",
    },
}
# pip's words for "the index could not be reached" (as opposed to "no such wheel").
UNREACHABLE = (
    "NewConnectionError",
    "Temporary failure in name resolution",
    "Network is unreachable",
    "ConnectTimeout",
    "ProxyError",
    "Max retries exceeded",
)


def closure(target: dict[str, str]) -> dict[str, str | None]:
    """backhaul's runtime dependencies on `target`, transitively, extras included (redis[hiredis]):
    name -> the version installed here (None: not installed here, so any version with a wheel)."""
    base: dict[str, str] = {**cast(dict[str, str], default_environment()), **target}
    found: dict[str, str | None] = {}
    todo: list[tuple[str, frozenset[str]]] = [("backhaul", frozenset())]
    while todo:
        name, extras = todo.pop()
        try:
            requires = metadata.requires(name) or []
        except metadata.PackageNotFoundError:
            continue
        for line in requires:
            req = Requirement(line)
            wanted = req.marker is None or any(
                req.marker.evaluate({**base, "extra": extra}) for extra in {"", *extras}
            )
            dep = canonicalize_name(req.name)
            if not wanted or (dep in found and not req.extras):
                continue
            try:
                found[dep] = metadata.version(dep)
            except metadata.PackageNotFoundError:
                found[dep] = None
            todo.append((dep, frozenset(req.extras)))
    return found


def test_the_closure_is_judged_per_platform():
    assert "uvloop" not in closure(TARGETS["win_amd64"])
    assert "uvloop" in closure(TARGETS["macosx_11_0_arm64"])
    assert {"asyncssh", "cryptography", "pydantic-core", "orjson", "hiredis"} <= set(
        closure(TARGETS["win_amd64"])
    )


@pytest.mark.timeout(600)
@pytest.mark.parametrize("platform", sorted(TARGETS))
def test_every_dependency_has_a_wheel(platform: str, tmp_path: Path):
    wanted = closure(TARGETS[platform])
    pins = [name if version is None else f"{name}=={version}" for name, version in wanted.items()]
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "download",
            "--quiet",
            "--no-deps",
            "--only-binary=:all:",
            "--platform",
            platform,
            "--python-version",
            "3.11",
            "-d",
            str(tmp_path),
            *pins,
        ],
        capture_output=True,
        text=True,
        timeout=540,
    )
    unreachable = any(word in result.stderr for word in UNREACHABLE)
    if result.returncode != 0 and unreachable and not os.environ.get("CI"):
        pytest.skip(f"the package index is unreachable: {result.stderr.strip()[-300:]}")
    assert result.returncode == 0, result.stderr
    got = {canonicalize_name(p.name.split("-")[0]) for p in tmp_path.glob("*.whl")}
    assert got == set(wanted), set(wanted) ^ got
