"""`backhaul-edge serve` as systemd runs it: READY=1 once listening, watchdog, clean SIGTERM."""

from __future__ import annotations

import os
import resource
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import orjson

from edge.policy.admission import derived_total
from tests.support.servers import free_port

BIN = Path(sys.executable).parent


def test_serve_notifies_systemd_and_stops_on_sigterm(tmp_path: Path):
    notify_path = tmp_path / "notify.sock"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(notify_path))
    sock.settimeout(20)
    port = free_port()
    env = {
        **os.environ,
        "NOTIFY_SOCKET": str(notify_path),
        "WATCHDOG_USEC": "200000",  # 0.2 s: the edge must ping every 0.1 s
        "BACKHAUL_EDGE_PORT": str(port),
        "BACKHAUL_EDGE_AUTH": "none",
        "BACKHAUL_EDGE_UPSTREAM": f"http://127.0.0.1:{free_port()}",
        "BACKHAUL_EDGE_TELEMETRY_PATH": str(tmp_path / "t.jsonl"),
        "BACKHAUL_EDGE_KEYS_PATH": str(tmp_path / "keys.json"),
        "BACKHAUL_EDGE_BANS_PATH": str(tmp_path / "bans.json"),
        "BACKHAUL_EDGE_LOG_FORMAT": "json",
    }
    proc = subprocess.Popen(
        [str(BIN / "backhaul-edge"), "serve"],
        env=env,
        cwd=tmp_path,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    try:
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
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        assert proc.stderr is not None
        proc.stderr.close()
        sock.close()


def _soft_limit(pid: int) -> int:
    for line in Path(f"/proc/{pid}/limits").read_text().splitlines():
        if line.startswith("Max open files"):
            return int(line.split()[3])
    raise AssertionError("no 'Max open files' in /proc/PID/limits")


def test_serve_raises_its_descriptor_limit_to_the_hard_one(tmp_path: Path):
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    low = min(256, hard)

    def systemd_default() -> None:  # a low soft limit, as systemd's 1,024 without LimitNOFILE
        resource.setrlimit(resource.RLIMIT_NOFILE, (low, hard))

    notify_path = tmp_path / "notify.sock"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(notify_path))
    sock.settimeout(20)
    port = free_port()
    env = {
        **os.environ,
        "NOTIFY_SOCKET": str(notify_path),
        "BACKHAUL_EDGE_PORT": str(port),
        "BACKHAUL_EDGE_AUTH": "none",
        "BACKHAUL_EDGE_UPSTREAM": f"http://127.0.0.1:{free_port()}",
        "BACKHAUL_EDGE_TELEMETRY_PATH": str(tmp_path / "t.jsonl"),
        "BACKHAUL_EDGE_KEYS_PATH": str(tmp_path / "keys.json"),
        "BACKHAUL_EDGE_BANS_PATH": str(tmp_path / "bans.json"),
        "BACKHAUL_EDGE_LOG_FORMAT": "json",
    }
    proc = subprocess.Popen(
        [str(BIN / "backhaul-edge"), "serve"],
        env=env,
        cwd=tmp_path,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        preexec_fn=systemd_default,
    )
    try:
        assert "READY=1" in sock.recv(4096).decode()
        assert _soft_limit(proc.pid) == hard
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(10) == 0
        assert proc.stderr is not None
        events = [orjson.loads(line) for line in proc.stderr.read().splitlines()]
        listening = next(e for e in events if e["event"] == "edge.listening")
        assert listening["fd_limit"] == hard
        assert listening["max_connections"] == derived_total(hard, reserved=0)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        assert proc.stderr is not None
        proc.stderr.close()
        sock.close()
