"""`backhaul-edge keys add --fallback CLOUD | --local-only` (issue 13): what the CLI writes, what
`keys list` shows, the cloud name checked against the edge's settings, and a key written this way
reaching the cloud (or not) through a real edge.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from edge.__main__ import main as edge_main
from edge.policy.keys import read_keys_file
from tests.support.cloud import CHAT_MODEL, CloudStandIn, running_cloud
from tests.support.keyfiles import bearer
from tests.support.servers import edge, free_port

LOCAL = "llama3.2:1b"
GEN = {"model": LOCAL, "prompt": "hi", "stream": False}


def config(tmp_path: Path, base_url: str = "https://api.example.com/v1") -> Path:
    """An edge.toml with one cloud, `test`, and no model that falls back to it."""
    path = tmp_path / "edge.toml"
    path.write_text(
        f'[clouds.test]\nbase_url = "{base_url}"\nmodels = {{ "{LOCAL}" = "{CHAT_MODEL}" }}\n'
    )
    return path


def keys_cli(tmp_path: Path, *args: str) -> int:
    return edge_main(
        ["keys", "--config", str(config(tmp_path)), "--keys-path", str(tmp_path / "keys.json"),
         *args]
    )  # fmt: skip


def test_add_sets_the_cloud_and_list_shows_it(tmp_path: Path, capsys: pytest.CaptureFixture[str]):
    assert keys_cli(tmp_path, "add", "site", "--fallback", "test") == 0
    assert keys_cli(tmp_path, "add", "private", "--local-only") == 0
    assert keys_cli(tmp_path, "add", "plain") == 0
    stored = {k.name: k for k in read_keys_file(tmp_path / "keys.json").keys}
    assert (stored["site"].fallback, stored["site"].local_only) == ("test", False)
    assert (stored["private"].fallback, stored["private"].local_only) == (None, True)
    assert (stored["plain"].fallback, stored["plain"].local_only) == (None, False)
    capsys.readouterr()

    assert keys_cli(tmp_path, "list", "--json") == 0
    rows = json.loads(capsys.readouterr().out)
    assert [(r["name"], r["fallback"], r["local_only"]) for r in rows] == [
        ("site", "test", False),
        ("private", None, True),
        ("plain", None, False),
    ]

    assert keys_cli(tmp_path, "list") == 0
    lines = capsys.readouterr().out.splitlines()
    header = lines[0]
    at = header.index("cloud")
    cloud_column = {line.split()[0]: line[at:].split("  ")[0].strip() for line in lines[1:]}
    assert cloud_column == {"site": "test", "private": "local only", "plain": "-"}


def test_a_cloud_the_settings_do_not_configure_is_refused_before_the_file_is_written(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
):
    assert keys_cli(tmp_path, "add", "site", "--fallback", "groq") == 2
    err = capsys.readouterr().err
    assert err.startswith("backhaul-edge keys: --fallback 'groq'")
    assert "[clouds.groq]" in err and "clouds configured: test" in err
    assert "Traceback" not in err
    assert not (tmp_path / "keys.json").exists()  # no key whose secret was never shown

    # Settings with no cloud at all: the same, and it says there are none.
    path = str(tmp_path / "keys.json")
    assert edge_main(["keys", "--keys-path", path, "add", "site", "--fallback", "test"]) == 2
    assert "clouds configured: none" in capsys.readouterr().err
    assert not (tmp_path / "keys.json").exists()


def test_fallback_and_local_only_together_are_a_usage_error(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
):
    with pytest.raises(SystemExit) as exited:
        keys_cli(tmp_path, "add", "site", "--fallback", "test", "--local-only")
    assert exited.value.code == 2
    assert "not allowed with argument" in capsys.readouterr().err
    assert not (tmp_path / "keys.json").exists()


def edge_settings(tmp_path: Path, cloud: CloudStandIn) -> dict[str, Any]:
    """The edge the CLI's config describes, its cloud our stand-in; only keys name the cloud."""
    key_file = tmp_path / "cloud-key"
    key_file.write_text(cloud.api_key + "\n")
    return {
        "clouds": {
            "test": {
                "base_url": f"{cloud.url}/v1",
                "api_key_file": key_file,
                "models": {LOCAL: CHAT_MODEL},
            }
        },
        "auth": "keys",
        "keys_path": tmp_path / "keys.json",
    }


async def test_keys_the_cli_wrote_reach_the_cloud_or_stay_local(
    tmp_path: Path, http: aiohttp.ClientSession, capsys: pytest.CaptureFixture[str]
):
    secrets = {}
    for name, flags in (("site", ["--fallback", "test"]), ("private", ["--local-only"])):
        assert keys_cli(tmp_path, "add", name, *flags) == 0
        secrets[name] = capsys.readouterr().out.strip()
    assert keys_cli(tmp_path, "add", "plain") == 0
    secrets["plain"] = capsys.readouterr().out.strip()

    away = f"http://127.0.0.1:{free_port()}"  # the workstation is off
    async with (
        running_cloud() as cloud,
        edge(away, tmp_path, **edge_settings(tmp_path, cloud)) as e,
    ):
        answers = {}
        for name, secret in secrets.items():
            async with http.post(f"{e.url}/api/generate", json=GEN, headers=bearer(secret)) as r:
                answers[name] = (r.status, r.headers.get("X-Backhaul-Served-By"))
        assert answers["site"] == (200, "cloud:test")
        assert answers["private"][0] == 503 and answers["plain"][0] == 503
        assert len(cloud.requests) == 1
