"""Where each program keeps its files: in its state directory, by default the systemd unit's,
never in the working directory (a benchmark run from the checkout once left a bans.json holding
a ban of 127.0.0.1 there)."""

from __future__ import annotations

import re
import types
from pathlib import Path
from typing import Any, get_args

import pytest

from agent.settings import AgentSettings
from edge.settings import EdgeSettings
from edge.telemetry import TelemetryWriter
from shared.errors import ConfigError

UNITS = Path(__file__).resolve().parent.parent / "systemd"


def _is_path(annotation: Any) -> bool:
    return annotation is Path or (
        isinstance(annotation, types.UnionType) and Path in get_args(annotation)
    )


EDGE_FILES = [
    name
    for name, field in EdgeSettings.model_fields.items()
    # The model server's API key and Redis's password are the operator's input, unset by
    # default: not kept.
    if _is_path(field.annotation)
    and name not in ("state_dir", "upstream_api_key_file", "redis_password_file")
]


def test_every_file_the_edge_keeps_is_in_its_state_dir_unless_named(tmp_path: Path):
    assert EDGE_FILES == [
        "telemetry_path",
        "keys_path",
        "bans_path",
        "budgets_path",
        "keys_shared_path",
        "ssh_host_key",
        "agent_keys",
    ]
    settings = EdgeSettings(state_dir=tmp_path)
    for name in EDGE_FILES:
        path = getattr(settings, name)
        assert path is not None and path.parent == tmp_path, name
    # A path given is used as given (relative: to the working directory), and unset stays unset.
    named = EdgeSettings(state_dir=tmp_path, keys_path=Path("keys.json"), bans_path=None)
    assert (named.keys_path, named.bans_path) == (Path("keys.json"), None)


@pytest.mark.parametrize(
    ("unit", "settings", "variable"),
    [
        ("backhaul-edge.service", EdgeSettings, "BACKHAUL_EDGE_STATE_DIR"),
        ("backhaul-agent.service", AgentSettings, "BACKHAUL_AGENT_STATE_DIR"),
    ],
)
def test_the_default_state_dir_is_the_units(unit: str, settings: Any, variable: str):
    text = (UNITS / unit).read_text()
    match = re.search(r"^StateDirectory=(\S+)$", text, re.MULTILINE)
    assert match is not None
    assert settings.model_fields["state_dir"].default == Path("/var/lib") / match[1]
    # The unit says so too, so it holds if StateDirectory (or the default) ever changes.
    assert f"Environment={variable}=%S/{match[1]}\n" in text


def test_an_edge_whose_state_dir_is_missing_refuses_to_start_rather_than_lose_lines(
    tmp_path: Path,
):
    settings = EdgeSettings(state_dir=tmp_path / "missing")
    with pytest.raises(ConfigError, match="BACKHAUL_EDGE_STATE_DIR"):
        TelemetryWriter(settings.telemetry_path)
