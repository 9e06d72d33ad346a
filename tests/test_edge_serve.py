"""`backhaul-edge serve` as systemd runs it: READY=1 once listening, watchdog, clean SIGTERM."""

from __future__ import annotations

import resource
import signal
import time
import urllib.request
from pathlib import Path

from edge.policy.admission import derived_total
from tests.support.processes import edge_process, events, notify_socket


def test_serve_notifies_systemd_and_stops_on_sigterm(tmp_path: Path):
    watchdog = {"WATCHDOG_USEC": "200000"}  # 0.2 s: the edge must ping every 0.1 s
    with (
        notify_socket(tmp_path) as sock,
        edge_process(tmp_path, notify=sock, env=watchdog) as (proc, port),
    ):
        ready = sock.recv(4096).decode()
        assert "READY=1" in ready and f":{port}" in ready
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=10) as r:
            assert r.status == 200  # READY came after the listener was up
        pings = [sock.recv(4096).decode() for _ in range(3)]
        assert pings == ["WATCHDOG=1"] * 3
        start = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(10) == 0
        assert time.monotonic() - start < 5
        messages = []
        sock.settimeout(0.5)
        try:
            while True:
                messages.append(sock.recv(4096).decode())
        except TimeoutError:
            pass
        assert "STOPPING=1" in messages


def _soft_limit(pid: int) -> int:
    for line in Path(f"/proc/{pid}/limits").read_text().splitlines():
        if line.startswith("Max open files"):
            return int(line.split()[3])
    raise AssertionError("no 'Max open files' in /proc/PID/limits")


def test_serve_raises_its_descriptor_limit_to_the_hard_one(tmp_path: Path):
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    low = min(256, hard)
    with (
        notify_socket(tmp_path) as sock,
        # A low soft limit, as systemd's 1,024 without LimitNOFILE.
        edge_process(tmp_path, notify=sock, nofile=(low, hard)) as (proc, _port),
    ):
        assert "READY=1" in sock.recv(4096).decode()
        assert _soft_limit(proc.pid) == hard
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(10) == 0
    listening = next(e for e in events(tmp_path) if e["event"] == "edge.listening")
    assert listening["fd_limit"] == hard
    assert listening["max_connections"] == derived_total(hard, reserved=0)
