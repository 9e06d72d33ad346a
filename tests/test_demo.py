"""`make demo` keeps working: the whole pair end to end (with --once), as a user runs it."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_demo_shows_a_request_flowing(tmp_path: Path):
    done = subprocess.run(
        [sys.executable, "-m", "scripts.demo", "--once", "--state", str(tmp_path)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=90,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    out = done.stdout
    for header in ("X-Tok-Per-S", "X-Gen-Time", "X-Tokens"):
        assert f"{header}: " in out and f"{header}: None" not in out
    assert "agent connected" in out and "through the tunnel" in out
    assert "final chunk: eval_count=" in out
    lines = (tmp_path / "telemetry.jsonl").read_text().splitlines()
    assert len(lines) == 2
    for line in lines:
        assert '"status":200' in line and '"outcome":"ok"' in line
