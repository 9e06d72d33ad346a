"""The edge's background loops live and die with it: one that fails stops the edge, loudly."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from edge.services import open_edge
from edge.settings import EdgeSettings
from tests.support.keyfiles import captured_logs
from tests.support.servers import simulator


async def test_a_loop_that_fails_stops_the_edge_with_its_error(tmp_path: Path):
    """A probe loop that meets an error nobody expected (here: its HTTP session was closed
    under it) must not leave the edge serving with a frozen upstream state: the failure is
    logged with its traceback, the body of `open_edge` is cancelled, the error leaves it."""
    settings = EdgeSettings(
        auth="none",
        telemetry_path=tmp_path / "telemetry.jsonl",
        bans_path=tmp_path / "bans.json",
        keys_path=tmp_path / "keys.json",
        probe_interval=0.05,
    )
    with captured_logs() as logs:
        async with simulator() as sim:
            settings = settings.model_copy(update={"upstream": sim.url})
            served_on = asyncio.Event()

            async def serve() -> None:
                async with asyncio.timeout(10), open_edge(settings) as edge:
                    await edge.sessions.pooled.close()
                    served_on.set()
                    await asyncio.Event().wait()  # serving: only the loop's failure ends it

            with pytest.raises(RuntimeError, match="Session is closed"):
                await serve()
            assert served_on.is_set()
    [failed] = [x for x in logs if x["event"] == "edge.loop_failed"]
    assert failed["loop"] == "probe" and "exc_info" in failed


async def test_loops_stop_with_the_edge_and_its_state_is_saved(tmp_path: Path):
    """A normal exit cancels every loop and keeps what they kept (the ban list)."""
    settings = EdgeSettings(
        auth="keys",
        telemetry_path=tmp_path / "telemetry.jsonl",
        bans_path=tmp_path / "bans.json",
        keys_path=tmp_path / "keys.json",
    )
    async with open_edge(settings) as edge:
        edge.guard.bans.ban("203.0.113.9", edge.guard.bans.clock() + 3600)
        loops = [t for t in asyncio.all_tasks() if t.get_name() in {"probe", "bans-saver"}]
        assert len(loops) == 2
    assert all(t.done() for t in loops)
    assert "203.0.113.9" in (tmp_path / "bans.json").read_text()
