"""Hardening of the edge's front door (issue 8): how the `Authorization` header is read.

A real edge with a keys file in front of the simulator, an aiohttp client on loopback.
"""

from __future__ import annotations

from pathlib import Path

import aiohttp

from edge.auth import GUARD
from tests.keyfiles import captured_logs, keyed, reached, write_keys
from tests.servers import edge, simulator

MODEL = "llama3.2:1b"
GEN = {"model": MODEL, "prompt": "why", "stream": False}


async def test_a_key_after_a_tab_or_any_case_of_bearer_is_served_and_no_failure(
    tmp_path: Path, http: aiohttp.ClientSession
):
    secrets = write_keys(tmp_path / "keys.json", good={})
    key = secrets["good"]
    # RFC 9110: the scheme is case-insensitive; HTAB read as SP, as tolerant servers do.
    spellings = [
        f"Bearer\t{key}",
        f"bearer {key}",
        f"BEARER  {key}",
        f"Bearer \t {key} \t",
        f"\tBearer\t\t{key}",
    ]
    with captured_logs() as logs:
        async with simulator() as sim, edge(sim.url, tmp_path, **keyed(tmp_path)) as e:
            for n, value in enumerate(spellings):
                headers = {"Authorization": value, "X-Request-Id": f"ok-{n}"}
                async with http.post(f"{e.url}/api/generate", json=GEN, headers=headers) as r:
                    assert r.status == 200, value
                assert (await e.record(f"ok-{n}"))["key"] == "good"
            assert len(reached(sim)) == len(spellings)
            assert not e.app[GUARD].bans._failures, "no failure counted towards a ban"

            # The wrong key with a TAB is still a wrong key, counted as one.
            wrong = {"Authorization": "Bearer\tbh_" + "A" * 43, "X-Request-Id": "wrong"}
            async with http.post(f"{e.url}/api/generate", json=GEN, headers=wrong) as r:
                assert r.status == 401
                assert (await r.json())["type"] == "unauthorized"
            assert (await e.record("wrong"))["type"] == "unauthorized"
            assert len(e.app[GUARD].bans._failures) == 1
    failed = [x for x in logs if x["event"] == "auth.failed"]
    assert [x["request_id"] for x in failed] == ["wrong"]
