"""Token budgets per key (issue 12): served until the day's tokens are spent, then 429
`budget_exhausted` in the route's shape until the reset; the spend kept across a restart of the
edge; `keys add --budget` and `keys list` on the command line."""

from __future__ import annotations

import asyncio
import json
import re
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import pytest

from edge.__main__ import main as edge_main
from edge.policy.budgets import LocalBudgets, Period, read_spend
from edge.policy.keys import Budget, read_keys_file
from tests.support.keyfiles import bearer, keyed, reached, write_keys
from tests.support.servers import Edge, edge, simulator

MODEL = "llama3.2:1b"
# "why" is one prompt token; the simulator replies with REPLY tokens: 41 tokens an answer, so
# a budget of 100 serves 3 answers (0, 41, 82 spent before each) and refuses the 4th (123).
REPLY = 40
PER_ANSWER = 1 + REPLY
BUDGET = {"tokens": 100, "period": "day"}
GEN = {"model": MODEL, "prompt": "why", "stream": False}
CHAT: dict[str, Any] = {"model": MODEL, "messages": [{"role": "user", "content": "why"}]}
_RESET = re.compile(r"it resets at (\d{4}-\d{2}-\d{2}T00:00:00Z)")
# Seconds a test waits for the running edge's first save of the budgets file.
_SAVE_S = 10.0


async def generate(http: aiohttp.ClientSession, e: Edge, secret: str, rid: str) -> int:
    headers = {**bearer(secret), "X-Request-Id": rid}
    async with http.post(f"{e.url}/api/generate", json=GEN, headers=headers) as r:
        await r.read()
        return r.status


def assert_refusal(message: str, retry_after: str) -> None:
    """The message names the reset (the next midnight UTC); Retry-After counts down to it."""
    found = _RESET.search(message)
    assert found, message
    reset = datetime.fromisoformat(found[1].replace("Z", "+00:00"))
    left = reset.timestamp() - time.time()
    assert 0 < left <= 86_400
    assert 0 < int(retry_after) <= 86_400
    assert abs(int(retry_after) - left) < 60


def wait_saved(path: Path, name: str, tokens: int) -> None:
    deadline = time.monotonic() + _SAVE_S
    while not (path.exists() and sum(read_spend(path).get(name, {}).values()) == tokens):
        assert time.monotonic() < deadline, f"no spend of {tokens} for {name} in {path}"
        time.sleep(0.05)


async def test_a_key_is_served_until_its_budget_is_spent_then_refused_until_the_reset(
    tmp_path: Path, http: aiohttp.ClientSession
):
    keys_path, budgets_path = tmp_path / "keys.json", tmp_path / "budgets.json"
    secrets = write_keys(keys_path, capped={"budget": BUDGET}, other={"budget": BUDGET})
    # A period long gone, saved by an earlier run: dropped, not counted.
    budgets_path.write_bytes(orjson.dumps({"version": 1, "spent": {"capped": {"2020-01-01": 7}}}))
    settings = keyed(tmp_path, budgets_path=budgets_path)
    async with simulator(reply_tokens=REPLY) as sim, edge(sim.url, tmp_path, **settings) as e:
        statuses = [await generate(http, e, secrets["capped"], f"gen-{i}") for i in range(3)]
        assert statuses == [200, 200, 200]
        record = await e.record("gen-0")
        assert record["prompt_tokens"] + record["tokens"] == PER_ANSWER
        # The running edge saves the spend soon after it changes.
        await asyncio.to_thread(wait_saved, budgets_path, "capped", PER_ANSWER)

        # Spent (123 of 100): refused in Ollama's shape on /api/*...
        headers = {**bearer(secrets["capped"]), "X-Request-Id": "over"}
        async with http.post(f"{e.url}/api/generate", json=GEN, headers=headers) as r:
            assert r.status == 429
            body = await r.json()
            retry_after = r.headers["Retry-After"]
        assert body["type"] == "budget_exhausted" and body["request_id"] == "over"
        assert "key 'capped' used its budget of 100 tokens per day" in body["error"]
        assert_refusal(body["error"], retry_after)
        record = await e.record("over")
        assert record["status"] == 429 and record["type"] == "budget_exhausted"
        assert record["key"] == "capped"
        # ...and in OpenAI's on /v1/*.
        async with http.post(
            f"{e.url}/v1/chat/completions", json=CHAT, headers=bearer(secrets["capped"])
        ) as r:
            assert r.status == 429
            error = (await r.json())["error"]
            assert_refusal(error["message"], r.headers["Retry-After"])
        assert error["type"] == error["code"] == "budget_exhausted"
        assert len(reached(sim)) == 3, "a refused request never reaches the model server"

        # Another key has its own budget.
        assert await generate(http, e, secrets["other"], "other-0") == 200

    # A restart (the same state files) keeps the day's spend.
    saved = read_spend(budgets_path)
    today = Period.current("day", time.time()).label
    assert saved == {"capped": {today: 3 * PER_ANSWER}, "other": {today: PER_ANSWER}}
    async with simulator(reply_tokens=REPLY) as sim, edge(sim.url, tmp_path, **settings) as e:
        assert await generate(http, e, secrets["capped"], "after-restart") == 429
        assert (await e.record("after-restart"))["type"] == "budget_exhausted"
        assert await generate(http, e, secrets["other"], "other-1") == 200
        assert reached(sim) == ["/api/generate"]
    assert read_spend(budgets_path)["other"] == {today: 2 * PER_ANSWER}


def test_keys_list_shows_the_budget_and_this_periods_spend(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
):
    keys_path, budgets_path = tmp_path / "keys.json", tmp_path / "budgets.json"
    write_keys(keys_path, capped={"budget": BUDGET}, big={"budget": {"tokens": 2_000_000,
               "period": "month"}}, plain={})  # fmt: skip
    now = time.time()
    day, month = Period.current("day", now).label, Period.current("month", now).label
    spent = {"capped": {day: 123, "2020-01-01": 99}, "big": {month: 500_000}}
    budgets_path.write_bytes(orjson.dumps({"version": 1, "spent": spent}))
    args = ["keys", "--keys-path", str(keys_path), "--budgets-path", str(budgets_path), "list"]

    assert edge_main([*args, "--json"]) == 0
    rows = {row["name"]: row for row in json.loads(capsys.readouterr().out)}
    assert rows["capped"]["budget"] == BUDGET
    capped = rows["capped"]["spent"]
    assert (capped["period"], capped["tokens"], capped["percent"]) == (day, 123, 123.0)
    assert capped["resets"] == Period.current("day", now).end.strftime("%Y-%m-%dT%H:%M:%SZ")
    assert rows["big"]["spent"]["tokens"] == 500_000 and rows["big"]["spent"]["percent"] == 25.0
    assert rows["plain"]["budget"] is None and rows["plain"]["spent"] is None

    assert edge_main(args) == 0
    table = capsys.readouterr().out
    [capped_line] = [line for line in table.splitlines() if line.startswith("capped ")]
    assert "100/day" in capped_line and "123 (123.0%)" in capped_line
    [big_line] = [line for line in table.splitlines() if line.startswith("big ")]
    assert "2M/month" in big_line and "500,000 (25.0%)" in big_line

    # No budgets file yet (an edge that never charged): nothing spent.
    budgets_path.unlink()
    assert edge_main([*args, "--json"]) == 0
    rows = {row["name"]: row for row in json.loads(capsys.readouterr().out)}
    assert rows["capped"]["spent"]["tokens"] == 0
    # A budgets file that is not one: a message and status 2, not a traceback.
    budgets_path.write_text("[1, 2]")
    assert edge_main(args) == 2
    assert "the budgets file" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("text", "budget"),
    [
        ("1000000/month", Budget(tokens=1_000_000, period="month")),
        ("1M/month", Budget(tokens=1_000_000, period="month")),
        ("1.5M/month", Budget(tokens=1_500_000, period="month")),
        ("500k/day", Budget(tokens=500_000, period="day")),
        ("100/day", Budget(tokens=100, period="day")),
    ],
)
def test_keys_add_budget(tmp_path: Path, text: str, budget: Budget):
    path = tmp_path / "keys.json"
    assert edge_main(["keys", "--keys-path", str(path), "add", "k", "--budget", text]) == 0
    [key] = read_keys_file(path).keys
    assert key.budget == budget


@pytest.mark.parametrize(
    "text", ["lots", "100/week", "0/day", "1.5/day", "100", "/day", "1G/month", "-5/day"]
)
def test_a_bad_budget_is_a_usage_error(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], text: str
):
    path = tmp_path / "keys.json"
    with pytest.raises(SystemExit) as stopped:
        edge_main(["keys", "--keys-path", str(path), "add", "k", f"--budget={text}"])
    assert stopped.value.code == 2
    err = capsys.readouterr().err
    assert "is not a budget: write TOKENS/day or TOKENS/month" in err
    assert not path.exists()


def test_periods_are_utc_calendar_days_and_months():
    at = datetime(2026, 12, 31, 23, 59, 30, tzinfo=UTC).timestamp()
    day, month = Period.current("day", at), Period.current("month", at)
    assert (day.label, day.end) == ("2026-12-31", datetime(2027, 1, 1, tzinfo=UTC))
    assert (month.label, month.end) == ("2026-12", datetime(2027, 1, 1, tzinfo=UTC))
    feb = Period.current("month", datetime(2028, 2, 10, tzinfo=UTC).timestamp())
    assert (feb.start, feb.end) == (
        datetime(2028, 2, 1, tzinfo=UTC),
        datetime(2028, 3, 1, tzinfo=UTC),
    )
    assert Period.parse("2026-12") == month and Period.parse("2026-12-31") == day
    assert Period.parse("2026-13") is None and Period.parse("2026-02-30") is None


async def test_a_broken_budgets_file_is_kept_aside_and_ended_periods_are_dropped(tmp_path: Path):
    path = tmp_path / "budgets.json"
    path.write_text('{"spent": {"k": {"someday": 5}}}')
    store = LocalBudgets(path, clock=lambda: datetime(2026, 11, 22, 12, tzinfo=UTC).timestamp())
    store.load()
    assert (tmp_path / "budgets.json.broken").read_text() == '{"spent": {"k": {"someday": 5}}}'
    today = Period.current("day", store.clock())
    assert store.spent("k", today) == 0
    store.charge("k", today, 30)
    store.charge("k", Period.parse("2026-11-21") or today, 9)  # yesterday: ended
    await store.close()
    assert read_spend(path) == {"k": {"2026-11-22": 30}}
