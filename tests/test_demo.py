"""`make demo` keeps working: the pool of two agents end to end (with --once), as a user runs it.

`--simulated`: the two simulators even on a machine where a real Ollama answers.
"""

from __future__ import annotations

import re
import subprocess
import sys
from collections import Counter
from pathlib import Path

import orjson

ROOT = Path(__file__).resolve().parent.parent


def test_demo_routes_by_model_across_two_agents(tmp_path: Path):
    done = subprocess.run(
        [sys.executable, "-m", "scripts.demo", "--once", "--simulated", "--state", str(tmp_path)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    out = done.stdout
    for header in ("X-Tok-Per-S", "X-Gen-Time", "X-Tokens"):
        assert f"{header}: " in out and f"{header}: None" not in out
    assert "rtx-box and mac-mini connected" in out
    assert "final chunk: eval_count=" in out
    for name in ("rtx-box", "mac-mini"):  # its row in the /agents table, and its own state dir
        assert re.search(rf"^  {name} +up +", out, re.MULTILINE), out
        assert (tmp_path / name / "agent_ed25519_key").exists()
    assert [line.split()[-1] for line in (tmp_path / "agent_keys").read_text().splitlines()] == [
        "rtx-box",
        "mac-mini",
    ]

    records = [orjson.loads(line) for line in (tmp_path / "telemetry.jsonl").read_bytes().split()]
    failed = [r for r in records if r["status"] != 200 or r["outcome"] != "ok"]
    assert not failed, failed
    by_model: dict[str, Counter[str]] = {}
    for record in records:
        by_model.setdefault(record["model"], Counter())[record["agent"]] += 1
    assert by_model["qwen2.5:0.5b"] == Counter({"rtx-box": 1})  # only rtx-box serves it
    assert by_model["phi3:mini"] == Counter({"mac-mini": 1})  # only mac-mini serves it
    shared = by_model["llama3.2:1b"]  # both serve it: both took some
    assert shared.total() == 12 and set(shared) == {"rtx-box", "mac-mini"}, shared
    for name, took in shared.items():  # what the demo says is what the telemetry says
        assert f"{name} took {took}" in out
