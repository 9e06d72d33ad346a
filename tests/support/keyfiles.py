"""Helpers for the security tests: keys files, a movable clock, and the "no secret leaked" check."""

from __future__ import annotations

from collections.abc import Iterator, Mapping, MutableMapping, Sequence
from contextlib import contextmanager
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest
import structlog

from edge.policy.keys import ApiKey, KeysFile, digest, new_secret, write_keys_file
from shared.logging import CONTEXT_PROCESSORS
from tests.support.servers import Edge, forwarded


def write_keys(path: Path, **keys: dict[str, Any]) -> dict[str, str]:
    """Write a keys file with one key per keyword (its settings); returns name -> secret."""
    secrets = {name: new_secret() for name in keys}
    entries = [ApiKey(name=name, hash=digest(secrets[name]), **spec) for name, spec in keys.items()]
    write_keys_file(path, KeysFile(keys=entries))
    return secrets


def keyed(tmp_path: Path, **settings: Any) -> dict[str, Any]:
    """Edge settings for `auth = "keys"` with the keys file in `tmp_path`, reloaded every 50 ms
    so that a test sees an edit at once; `settings` add to them."""
    return {
        "auth": "keys",
        "keys_path": tmp_path / "keys.json",
        "keys_reload_interval": 0.05,
        **settings,
    }


def bearer(secret: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {secret}"}


class Clock:
    """A monotonic clock the test moves by hand."""

    def __init__(self, now: float = 1000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


@contextmanager
def captured_logs() -> Iterator[list[MutableMapping[str, Any]]]:
    # With the context the edge binds (the request id), as the production log has it.
    with structlog.testing.capture_logs(list(CONTEXT_PROCESSORS)) as logs:
        yield logs


async def assert_no_secret(
    e: Edge,
    secrets: dict[str, str],
    logs: Sequence[Mapping[str, Any]],
    caplog: pytest.LogCaptureFixture | None = None,
) -> None:
    """No secret in the telemetry file, the structlog events or the stdlib log."""
    await e.records()  # flushed
    text = e.telemetry_path.read_text() if e.telemetry_path.exists() else ""
    text += repr(logs) + (caplog.text if caplog is not None else "")
    for secret in secrets.values():
        assert secret not in text
        assert secret[3:20] not in text  # not even a fragment


def reached(sim: Any) -> list[str]:
    """Paths of the requests that reached the simulator, its liveness probes left out."""
    return forwarded(sim)


def past(iso: str = "2020-01-01T00:00:00+00:00") -> datetime:
    return datetime.fromisoformat(iso)
