"""The keys file and the telemetry path as the edge finds them on disk (issues 8 and 16).

A path that is not a regular file (a FIFO would block whoever opens it), a keys file that others
may write, a keys file that does not parse: each is refused with a message that says what and
how to fix it; at start the edge stops, at reload it keeps the last good keys. The FIFO cases
run the real `backhaul-edge serve` process, since a blocked event loop would hang the test
itself; each wait is bounded.
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import pytest

from edge.policy.keys import digest, new_secret
from shared.errors import ConfigError
from tests.support.keyfiles import bearer, captured_logs, keyed, write_keys
from tests.support.processes import EDGE, edge_process, events
from tests.support.servers import edge

# Seconds a started edge has to answer /healthz, and a stopped one to exit.
_START_S = 20.0
_STOP_S = 10.0


def wait_event(tmp_path: Path, name: str) -> dict[str, Any]:
    deadline = time.monotonic() + _START_S
    while time.monotonic() < deadline:
        found = [e for e in events(tmp_path) if e["event"] == name]
        if found:
            return found[0]
        time.sleep(0.05)
    raise AssertionError(f"no {name} in {events(tmp_path)}")


def wait_line(path: Path) -> None:
    deadline = time.monotonic() + _START_S
    while not (path.exists() and path.stat().st_size):
        assert time.monotonic() < deadline, f"nothing written to {path}"
        time.sleep(0.02)


def get(port: int, path: str, secret: str | None = None) -> int:
    headers = bearer(secret) if secret else {}
    request = urllib.request.Request(f"http://127.0.0.1:{port}{path}", headers=headers)
    try:
        with urllib.request.urlopen(request, timeout=5) as r:  # noqa: S310 - http, loopback
            return int(r.status)
    except urllib.error.HTTPError as exc:
        return exc.code


def wait_healthy(port: int) -> None:
    deadline = time.monotonic() + _START_S
    while time.monotonic() < deadline:
        try:
            if get(port, "/healthz") == 200:
                return
        except OSError:
            pass
        time.sleep(0.05)
    raise AssertionError("the edge did not start")


def stop_within_bound(proc: subprocess.Popen[bytes]) -> None:
    start = time.monotonic()
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(_STOP_S) == 0
    assert time.monotonic() - start < _STOP_S


def test_fifo_at_the_keys_path_stops_the_edge_at_start(tmp_path: Path):
    os.mkfifo(tmp_path / "keys.json")
    with edge_process(tmp_path, auth="keys") as (proc, _port):
        assert proc.wait(_START_S) == 2
    refused = wait_event(tmp_path, "edge.refused_to_start")
    assert "is not a regular file (a FIFO)" in refused["error"]
    assert str(tmp_path / "keys.json") in refused["error"]
    assert "Traceback" not in (tmp_path / "edge.log").read_text()


def test_fifo_at_the_keys_path_on_reload_keeps_the_last_keys(tmp_path: Path):
    secrets = write_keys(tmp_path / "keys.json", ops={})
    with edge_process(tmp_path, auth="keys", keys_reload_interval="0.1") as (proc, port):
        wait_healthy(port)
        assert get(port, "/api/tags", secrets["ops"]) == 503  # past auth: the agent is away
        (tmp_path / "keys.json").unlink()
        os.mkfifo(tmp_path / "keys.json")
        proc.send_signal(signal.SIGHUP)
        refused = wait_event(tmp_path, "keys.reload_refused")
        assert "not a regular file (a FIFO)" in refused["error"] and refused["kept"] == 1
        assert get(port, "/healthz") == 200  # the loop is free
        assert get(port, "/api/tags", secrets["ops"]) == 503  # the last keys are in force
        stop_within_bound(proc)


def test_fifo_at_the_telemetry_path_stops_the_edge_at_start(tmp_path: Path):
    os.mkfifo(tmp_path / "t.jsonl")
    with edge_process(tmp_path) as (proc, _port):
        assert proc.wait(_START_S) == 2
    refused = wait_event(tmp_path, "edge.refused_to_start")
    assert (
        f"the telemetry path {tmp_path / 't.jsonl'} is not a regular file (a FIFO)"
        in (refused["error"])
    )


@pytest.mark.parametrize("reader", [False, True], ids=["no-reader", "reader"])
def test_fifo_at_the_telemetry_path_while_serving_is_logged_and_shutdown_is_prompt(
    tmp_path: Path, reader: bool
):
    with edge_process(tmp_path) as (proc, port):
        wait_healthy(port)
        assert get(port, "/api/tags") == 503
        wait_line(tmp_path / "t.jsonl")  # the writer has the file open
        (tmp_path / "t.jsonl").unlink()
        os.mkfifo(tmp_path / "t.jsonl")
        # With a reader, a plain open would succeed: the check after it is what refuses.
        fd = os.open(tmp_path / "t.jsonl", os.O_RDONLY | os.O_NONBLOCK) if reader else None
        try:
            proc.send_signal(signal.SIGHUP)  # logrotate's signal: reopen the path
            time.sleep(0.1)  # let the edge handle it before the next line
            assert get(port, "/api/tags") == 503
            failed = wait_event(tmp_path, "telemetry.write_failed")
            assert "is not a regular file (a FIFO)" in failed["error"]
            assert get(port, "/healthz") == 200
            stop_within_bound(proc)
        finally:
            if fd is not None:
                os.close(fd)


def test_keys_cli_refuses_a_fifo_at_once(tmp_path: Path):
    os.mkfifo(tmp_path / "keys.json")
    done = subprocess.run(
        [EDGE, "keys", "--keys-path", str(tmp_path / "keys.json"), "list"],
        capture_output=True,
        timeout=_START_S,
        check=False,
    )
    assert done.returncode == 2
    assert b"is not a regular file (a FIFO)" in done.stderr


@pytest.mark.parametrize("mode", [0o664, 0o646, 0o622])
async def test_keys_file_writable_by_others_stops_the_edge_at_start(tmp_path: Path, mode: int):
    path = tmp_path / "keys.json"
    write_keys(path, ops={})
    path.chmod(mode)
    with pytest.raises(ConfigError) as refused:
        async with edge("http://127.0.0.1:1", tmp_path, **keyed(tmp_path)):
            pass
    message = str(refused.value)
    assert f"mode {mode:04o}" in message
    assert f"chmod 600 {path}" in message and "writable by its group or by others" in message


async def test_keys_file_made_writable_by_others_is_refused_on_reload(
    tmp_path: Path, http: aiohttp.ClientSession
):
    path = tmp_path / "keys.json"
    old = write_keys(path, old={})
    async with edge("http://127.0.0.1:1", tmp_path, **keyed(tmp_path)) as e:
        keys = e.edge.guard.keys
        assert keys is not None
        with captured_logs() as logs:
            new = write_keys(path, new={})
            path.chmod(0o666)
            await _until(lambda: any(x["event"] == "keys.reload_refused" for x in logs))
        [refused] = [x for x in logs if x["event"] == "keys.reload_refused"]
        assert "mode 0666" in refused["error"] and refused["kept"] == 1
        assert await _status(http, e.url, old["old"]) == 503  # the last keys stay
        assert await _status(http, e.url, new["new"]) == 401
        # A change of mode alone is noticed: fixed, the file loads.
        generation = keys.generation
        path.chmod(0o600)
        async with asyncio.timeout(5):
            await keys.wait_generation(generation + 1)
        assert await _status(http, e.url, new["new"]) == 503


async def test_broken_keys_file_at_start_says_what_is_wrong_without_values(tmp_path: Path):
    path = tmp_path / "keys.json"
    stray = new_secret()
    entries = [
        {"name": "ok", "hash": digest(new_secret())},
        {"name": "bad name!", "hash": stray},  # a secret pasted where its digest belongs
    ]
    path.write_bytes(orjson.dumps({"version": 1, "keys": entries}))
    path.chmod(0o600)
    with pytest.raises(ConfigError) as refused:
        async with edge("http://127.0.0.1:1", tmp_path, **keyed(tmp_path)):
            pass
    message = str(refused.value)
    assert message.startswith(f"the keys file {path} is invalid: ")
    assert "keys.1.name: String should match pattern" in message
    assert "keys.1.hash: String should match pattern" in message
    assert stray not in message and stray[3:20] not in message
    assert "create a key" not in message

    path.write_bytes(b'{"version": 1, "keys": [')
    with pytest.raises(ConfigError, match=r"is not valid JSON"):
        async with edge("http://127.0.0.1:1", tmp_path, **keyed(tmp_path)):
            pass


async def _status(http: aiohttp.ClientSession, url: str, secret: str) -> int:
    async with http.get(f"{url}/api/tags", headers=bearer(secret)) as r:
        return r.status


async def _until(condition: Any) -> None:
    """A bounded wait for a log event (a refused reload changes nothing else to wait on)."""
    async with asyncio.timeout(5):
        while not condition():  # noqa: ASYNC110 - a log event has no Event to wait on
            await asyncio.sleep(0.02)
