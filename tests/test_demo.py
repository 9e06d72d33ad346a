"""`make demo` keeps working: run it end to end (with --once) as a user would."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_demo_shows_a_request_flowing(tmp_path: Path):
    telemetry = tmp_path / "demo.jsonl"
    done = subprocess.run(
        [sys.executable, "-m", "scripts.demo", "--once", "--telemetry", str(telemetry)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    out = done.stdout
    for header in ("X-Tok-Per-S", "X-Gen-Time", "X-Tokens"):
        assert f"{header}: " in out and f"{header}: None" not in out
    assert "final chunk: eval_count=" in out
    assert len(telemetry.read_text().splitlines()) == 2
