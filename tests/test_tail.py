"""`backhaul-edge tail`: the compact line, --errors, -n, and following across rotation/truncation.

The follow loop is driven by a scripted `sleep`: each call changes the file the way the edge's
writer or logrotate would, so the order of events is fixed and no test waits on the clock (the
one subprocess test bounds every read with a deadline).
"""

from __future__ import annotations

import io
import os
import selectors
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

from edge.__main__ import main
from edge.ops.logfiles import LogFollower
from edge.ops.tail import format_record, tail_log
from edge.record import RequestRecord


def line(i: int, **fields) -> bytes:
    fields.setdefault("ts", f"2026-11-20T12:00:{i % 60:02d}.000Z")
    fields.setdefault("route", "/api/chat")
    fields.setdefault("key", f"k{i}")
    fields.setdefault("status", 200)
    return RequestRecord(id=f"req-{i}", method="POST", **fields).to_json_line()


def append(path: Path, data: bytes) -> None:
    with open(path, "ab") as out:
        out.write(data)


def keys_in(text: str) -> list[str]:
    """The key column of each output line, which the tests set to k<i>."""
    return [word for row in text.splitlines() for word in row.split() if word[:1] == "k"]


def scripted(*steps: Callable[[], object]) -> tuple[Callable[[float], None], Callable[[], bool]]:
    """A sleep that performs the next step each time it is called, and a stop for when done."""
    pending = list(steps)

    def sleep(_seconds: float) -> None:
        pending.pop(0)()

    def stop() -> bool:
        return not pending

    return sleep, stop


def test_compact_line_plain_and_coloured():
    rec = {
        "ts": "2026-11-20T12:34:56.789Z",
        "status": 200,
        "route": "/api/chat",
        "feature": "summarise",
        "model": "llama3.1:8b",
        "key": "site-a",
        "prompt_tokens": 512,
        "tokens": 128,
        "tok_per_s": 42.06,
        "elapsed_ms": 3210.0,
        "outcome": "ok",
    }
    plain = format_record(rec)
    assert plain.split() == [
        "12:34:56.789",
        "200",
        "summarise",
        "llama3.1:8b",
        "site-a",
        "512->128",
        "tok",
        "42.1",
        "tok/s",
        "3.21s",
    ]
    assert "\x1b" not in plain
    assert "\x1b[32m200\x1b[0m" in format_record(rec, colour=True)

    failed = {
        **rec,
        "status": 503,
        "type": "agent_unavailable",
        "feature": None,
        "outcome": "error",
    }
    failed.update(tok_per_s=None, tokens=None, prompt_tokens=None, elapsed_ms=4.0)
    text = format_record(failed)
    assert text.split()[2] == "/api/chat"
    assert text.endswith("4ms agent_unavailable")
    assert " - tok/s" in text
    coloured = format_record(failed, colour=True)
    assert "\x1b[31m503\x1b[0m" in coloured
    assert coloured.endswith("\x1b[31m agent_unavailable\x1b[0m")
    # Gone mid-stream after a 200: a failure, in magenta.
    gone = format_record({**rec, "outcome": "client_gone"}, colour=True)
    assert gone.endswith("\x1b[35m client_gone\x1b[0m")
    # Fields of the wrong type never break the line.
    assert format_record({"status": "x", "tokens": "many", "elapsed_ms": None}).split()[:2] == [
        "-",
        "-",
    ]


def test_last_records_via_main(tmp_path, capsys):
    log = tmp_path / "telemetry.jsonl"
    log.write_bytes(b"".join(line(i) for i in range(20)) + line(99)[:50])  # + a line in progress
    assert main(["tail", str(log), "-n", "3", "--no-follow"]) == 0
    out = capsys.readouterr().out
    assert keys_in(out) == ["k17", "k18", "k19"]
    assert "\x1b" not in out  # capsys is not a terminal

    assert main(["tail", str(log), "-n", "1", "--no-follow", "--color", "always"]) == 0
    assert "\x1b[32m200\x1b[0m" in capsys.readouterr().out


def test_errors_only_reaches_back_past_many_successes(tmp_path, capsys):
    log = tmp_path / "telemetry.jsonl"
    failures = [
        line(1, status=503, type="agent_unavailable", outcome="error"),
        line(2, status=429, type="rate_limited", outcome="error"),
        line(3, status=200, outcome="client_gone"),
    ]
    # Enough successes after them to span several of the backwards reader's 64 KiB chunks.
    log.write_bytes(b"".join(failures) + b"".join(line(1000 + i) for i in range(1000)))
    assert main(["tail", str(log), "--errors", "-n", "2", "--no-follow"]) == 0
    out = capsys.readouterr().out
    assert keys_in(out) == ["k2", "k3"]
    assert "rate_limited" in out
    assert "client_gone" in out


def test_missing_file_without_follow_is_an_error(tmp_path, capsys):
    assert main(["tail", str(tmp_path / "nope.jsonl"), "--no-follow"]) == 1
    assert "no such file" in capsys.readouterr().err


def test_follows_across_rotation_and_truncation(tmp_path):
    log = tmp_path / "telemetry.jsonl"
    log.write_bytes(line(0) + line(1))
    rec_c = line(4)

    def rotate() -> None:
        append(log, line(5))  # the writer's last line into the old file
        log.rename(tmp_path / "telemetry.jsonl.1")
        log.write_bytes(line(6))

    steps = [
        lambda: append(log, line(2) + line(3)),
        lambda: append(log, rec_c[:25]),  # a record half written...
        lambda: append(log, rec_c[25:]),  # ...and finished
        rotate,
        lambda: log.write_bytes(b""),  # copytruncate
        lambda: append(log, line(7)),
        lambda: log.rename(tmp_path / "telemetry.jsonl.2"),  # rotated, not recreated yet
        lambda: None,
        lambda: log.write_bytes(line(8) + b"junk\n"),
    ]
    sleep, stop = scripted(*steps)
    out, notices = io.StringIO(), list[str]()
    tail_log(log, out=out, notice=notices.append, count=1, sleep=sleep, stop=stop)

    assert keys_in(out.getvalue()) == [f"k{i}" for i in range(1, 9)]
    assert any("rotated" in n for n in notices)
    assert any("truncated" in n for n in notices)
    assert any("not a record" in n for n in notices)


def test_follow_with_errors_only(tmp_path):
    log = tmp_path / "telemetry.jsonl"
    log.write_bytes(line(0, status=500, type="internal", outcome="error") + line(1))
    sleep, stop = scripted(
        lambda: append(log, line(2) + line(3, status=401, type="unauthorized", outcome="error")),
        lambda: append(log, line(4, outcome="upstream_broken") + line(5)),
    )
    out = io.StringIO()
    tail_log(log, out=out, notice=lambda _: None, errors_only=True, sleep=sleep, stop=stop)
    assert keys_in(out.getvalue()) == ["k0", "k3", "k4"]


def test_follower_waits_for_the_file_and_holds_unfinished_lines(tmp_path):
    log = tmp_path / "telemetry.jsonl"
    notices: list[str] = []
    follower = LogFollower(log, notices.append)
    try:
        assert follower.start(10, lambda _line: True) == []
        assert follower.poll() == []
        assert notices == [f"{log}: not there yet; waiting for it"]
        log.write_bytes(line(1) + line(2)[:10])
        assert follower.poll() == [line(1)]  # read from the start: the file is new
        assert follower.poll() == []
        append(log, line(2)[10:])
        assert follower.poll() == [line(2)]
        # A rotation that leaves an unfinished record in the old file hands it over as it is.
        append(log, b'{"v":1,"cut')
        log.rename(tmp_path / "telemetry.jsonl.1")
        log.write_bytes(line(3))
        assert follower.poll() == [b'{"v":1,"cut', line(3)]
    finally:
        follower.close()


def read_line(proc: subprocess.Popen[bytes], deadline: float) -> str:
    assert proc.stdout is not None
    with selectors.DefaultSelector() as selector:
        selector.register(proc.stdout, selectors.EVENT_READ)
        if not selector.select(timeout=max(0.0, deadline - time.monotonic())):
            raise TimeoutError("no line from backhaul-edge tail in time")
    row: bytes = proc.stdout.readline()
    return row.decode()


def test_installed_script_follows_rotation(tmp_path):
    script = Path(sys.executable).with_name("backhaul-edge")
    log = tmp_path / "telemetry.jsonl"
    log.write_bytes(line(0))
    proc = subprocess.Popen(
        [str(script), "tail", str(log), "-n", "1"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    try:
        deadline = time.monotonic() + 10
        assert keys_in(read_line(proc, deadline)) == ["k0"]
        append(log, line(1))
        assert keys_in(read_line(proc, deadline)) == ["k1"]
        os.rename(log, tmp_path / "telemetry.jsonl.1")
        log.write_bytes(line(2, status=503, type="agent_unavailable", outcome="error"))
        row = read_line(proc, deadline)
        assert keys_in(row) == ["k2"]
        assert "\x1b" not in row  # a pipe, not a terminal
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=10) == 130
        assert proc.stderr is not None
        err = proc.stderr.read().decode()
        assert "rotated" in err
        assert "Traceback" not in err
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=10)
        for stream in (proc.stdout, proc.stderr):
            if stream is not None:
                stream.close()
