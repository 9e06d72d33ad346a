"""API keys: who gets in, what each refusal looks like, and reloading the file while serving."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import aiohttp
import ollama
import openai
import orjson
import pytest

from edge.__main__ import main as edge_main
from edge.policy.keys import read_keys_file
from tests.support.keyfiles import (
    assert_no_secret,
    bearer,
    captured_logs,
    keyed,
    past,
    reached,
    write_keys,
)
from tests.support.servers import edge, simulator

MODEL = "llama3.2:1b"
GEN = {"model": MODEL, "prompt": "why", "stream": False}
CHAT: dict[str, Any] = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}]}


async def test_missing_wrong_revoked_expired_keys_are_401_in_the_routes_shape(
    tmp_path: Path, http: aiohttp.ClientSession, caplog: pytest.LogCaptureFixture
):
    secrets = write_keys(
        tmp_path / "keys.json",
        good={},
        old={"enabled": False},
        stale={"expires": past()},
    )
    wrong = "bh_" + "A" * 43
    cases = [
        ("none", None, "an API key is required"),
        ("wrong", bearer(wrong), "invalid API key"),
        ("malformed", {"Authorization": "Bearer nope"}, "invalid API key"),
        ("scheme", {"Authorization": f"Basic {secrets['good']}"}, "invalid API key"),
        ("revoked", bearer(secrets["old"]), "revoked"),
        ("expired", bearer(secrets["stale"]), "expired"),
    ]
    with captured_logs() as logs:
        # 10 failures here would ban this address (tests/test_security_bans.py): not yet.
        settings = keyed(tmp_path, ban_threshold=100)
        async with simulator() as sim, edge(sim.url, tmp_path, **settings) as e:
            for name, headers, message in cases:
                rid = f"ollama-{name}"
                async with http.post(
                    f"{e.url}/api/generate",
                    json=GEN,
                    headers={**(headers or {}), "X-Request-Id": rid},
                ) as r:
                    assert r.status == 401, name
                    assert r.headers["WWW-Authenticate"].startswith("Bearer")
                    body = await r.json()
                # Ollama's shape on /api/*: {"error": "message"} plus type and request id.
                assert message in body["error"] and body["type"] == "unauthorized"
                assert body["request_id"] == rid
                async with http.post(
                    f"{e.url}/v1/chat/completions", json=CHAT, headers=headers or {}
                ) as r:
                    assert r.status == 401
                    error = (await r.json())["error"]  # OpenAI's shape on /v1/*
                assert message in error["message"] and error["type"] == "unauthorized"
                record = await e.record(rid)
                assert record["status"] == 401 and record["type"] == "unauthorized"
                assert record["key"] is None
            assert reached(sim) == [], "nothing reached the model server"
            # The good key works, and its name (only) is in the telemetry line.
            async with http.post(
                f"{e.url}/api/generate",
                json=GEN,
                headers={**bearer(secrets["good"]), "X-Request-Id": "ok"},
            ) as r:
                assert r.status == 200
            assert (await e.record("ok"))["key"] == "good"
            failed = [x for x in logs if x["event"] == "auth.failed"]
            assert {x["reason"] for x in failed} == {"unknown", "revoked", "expired"}
            assert {x["key"] for x in failed} == {None, "old", "stale"}
            await assert_no_secret(e, {**secrets, "wrong": wrong}, logs, caplog)


async def test_health_needs_no_key_and_forbidden_routes_stay_404_with_one(
    tmp_path: Path, http: aiohttp.ClientSession
):
    secrets = write_keys(tmp_path / "keys.json", ops={})
    async with simulator() as sim, edge(sim.url, tmp_path, **keyed(tmp_path)) as e:
        for path in ("/healthz", "/readyz"):
            async with http.get(f"{e.url}{path}") as r:
                assert r.status == 200
        paths = ["/api/pull", "/api/delete", "/api/%2e%2e/api/pull", "/API/TAGS", "/nope"]
        for i, path in enumerate(paths):
            headers = {**bearer(secrets["ops"]), "X-Request-Id": f"p{i}"}
            async with http.post(f"{e.url}{path}", json={"model": MODEL}, headers=headers) as r:
                assert r.status == 404, path
            record = await e.record(f"p{i}")
            assert record["status"] == 404 and record["type"] == "not_found"
        # Without a key the same paths say nothing about what exists: 401 before routing.
        async with http.post(f"{e.url}/api/pull", json={"model": MODEL}) as r:
            assert r.status == 401
        assert reached(sim) == []


async def test_model_outside_the_keys_allowlist_is_403(
    tmp_path: Path, http: aiohttp.ClientSession, caplog: pytest.LogCaptureFixture
):
    secrets = write_keys(tmp_path / "keys.json", narrow={"models": ["llama3.2"]})
    with captured_logs() as logs:
        async with simulator() as sim, edge(sim.url, tmp_path, **keyed(tmp_path)) as e:
            headers = bearer(secrets["narrow"])
            async with http.post(
                f"{e.url}/api/generate",
                json=GEN | {"model": "qwen2.5:0.5b"},
                headers={**headers, "X-Request-Id": "f"},
            ) as r:
                assert r.status == 403
                assert "not allowed for this API key" in (await r.json())["error"]
            record = await e.record("f")
            assert record["type"] == "forbidden" and record["key"] == "narrow"
            # `llama3.2` in the allowlist is `llama3.2:latest`, not `llama3.2:1b`.
            async with http.post(f"{e.url}/api/generate", json=GEN, headers=headers) as r:
                assert r.status == 403
            async with http.post(
                f"{e.url}/api/generate", json=GEN | {"model": "llama3.2:latest"}, headers=headers
            ) as r:
                # Allowed through: the pool knows no workstation has it, and says so itself.
                assert r.status == 404
                assert "not served by any workstation" in (await r.json())["error"]
            assert reached(sim) == []
            # Model lists show a key only the models it may use.
            async with http.get(f"{e.url}/api/tags", headers=headers) as r:
                assert [m["name"] for m in (await r.json())["models"]] == []
            async with http.get(f"{e.url}/v1/models", headers=headers) as r:
                assert (await r.json())["data"] == []
            await assert_no_secret(e, secrets, logs, caplog)


async def test_model_lists_follow_the_keys_allowlist(tmp_path: Path, http: aiohttp.ClientSession):
    secrets = write_keys(tmp_path / "keys.json", narrow={"models": ["qwen2.5:0.5b"]}, wide={})
    async with simulator() as sim, edge(sim.url, tmp_path, **keyed(tmp_path)) as e:
        async with http.get(f"{e.url}/api/tags", headers=bearer(secrets["narrow"])) as r:
            assert [m["name"] for m in (await r.json())["models"]] == ["qwen2.5:0.5b"]
        async with http.get(f"{e.url}/v1/models", headers=bearer(secrets["wide"])) as r:
            assert len((await r.json())["data"]) == 3  # every model the simulator has


async def test_no_keys_file_refuses_everything_and_tells_the_operator(
    tmp_path: Path, http: aiohttp.ClientSession
):
    with captured_logs() as logs:
        async with simulator() as sim, edge(sim.url, tmp_path, **keyed(tmp_path)) as e:
            for headers in ({}, bearer("bh_" + "B" * 43)):
                async with http.post(f"{e.url}/api/generate", json=GEN, headers=headers) as r:
                    assert r.status == 401
            assert reached(sim) == []
            assert len(e.edge.guard.bans) == 0, "the operator's mistake bans nobody"
            [hint] = [x for x in logs if x["event"] == "keys.none"]
            assert "backhaul-edge keys add" in hint["hint"]
            # The operator adds a key: it works within the reload interval, no restart.
            store = e.edge.guard.keys
            assert store is not None
            secrets = write_keys(tmp_path / "keys.json", first={})
            async with asyncio.timeout(5):
                await store.wait_generation(1)
            async with http.post(
                f"{e.url}/api/generate", json=GEN, headers=bearer(secrets["first"])
            ) as r:
                assert r.status == 200
            assert [r["status"] for r in await e.records()] == [401, 401, 200]


async def test_key_file_edited_while_a_stream_runs(
    tmp_path: Path, http: aiohttp.ClientSession, caplog: pytest.LogCaptureFixture
):
    path = tmp_path / "keys.json"
    secrets = write_keys(path, streamer={})
    with captured_logs() as logs:
        async with (
            simulator(reply_tokens=30, tok_per_s=60) as sim,
            edge(sim.url, tmp_path, **keyed(tmp_path)) as e,
        ):
            store = e.edge.guard.keys
            assert store is not None and store.generation == 1
            headers = {**bearer(secrets["streamer"]), "X-Request-Id": "s"}
            async with http.post(
                f"{e.url}/api/generate", json=GEN | {"stream": True}, headers=headers
            ) as r:
                assert r.status == 200
                first = await r.content.readline()
                assert first
                # Revoke it mid-stream (the CLI's way: a new file, atomically).
                assert edge_main(["keys", "--keys-path", str(path), "revoke", "streamer"]) == 0
                async with asyncio.timeout(5):
                    await store.wait_generation(2)
                lines = [first] + [line async for line in r.content]
            assert orjson.loads(lines[-1])["done"] is True, "the stream in flight completed"
            record = await e.record("s")
            assert (
                record["status"] == 200
                and record["outcome"] == "ok"
                and record["key"] == "streamer"
            )
            async with http.post(
                f"{e.url}/api/generate", json=GEN, headers=bearer(secrets["streamer"])
            ) as r:
                assert r.status == 401
                assert "revoked" in (await r.json())["error"]
            # A broken file is refused; the last good keys stay in force.
            path.write_text("{not json")
            assert store.load() is False  # what the watcher runs on each change
            assert [x["event"] for x in logs if x["event"].startswith("keys.")][-1] == (
                "keys.reload_refused"
            )
            assert store.generation == 2
            async with http.post(
                f"{e.url}/api/generate", json=GEN, headers=bearer(secrets["streamer"])
            ) as r:
                assert (
                    r.status == 401
                )  # still the revoked key's answer, not a crash or an open door
            await assert_no_secret(e, secrets, logs, caplog)


async def test_sdks_with_a_key(tmp_path: Path, caplog: pytest.LogCaptureFixture):
    secrets = write_keys(tmp_path / "keys.json", sdk={})
    with captured_logs() as logs:
        async with (
            simulator(reply_tokens=5) as sim,
            edge(sim.url, tmp_path, **keyed(tmp_path)) as e,
        ):
            client = openai.AsyncOpenAI(
                base_url=f"{e.url}/v1", api_key=secrets["sdk"], max_retries=0
            )
            async with client:
                reply = await client.chat.completions.create(model=MODEL, messages=CHAT["messages"])
                assert reply.choices[0].message.content
            bad = openai.AsyncOpenAI(
                base_url=f"{e.url}/v1", api_key="bh_" + "C" * 43, max_retries=0
            )
            async with bad:
                with pytest.raises(openai.AuthenticationError):
                    await bad.chat.completions.create(model=MODEL, messages=CHAT["messages"])
            native = ollama.AsyncClient(host=e.url, headers=bearer(secrets["sdk"]))
            try:
                chunks = [
                    c
                    async for c in await native.chat(
                        model=MODEL, messages=CHAT["messages"], stream=True
                    )
                ]
                assert chunks[-1].done
            finally:
                await native.close()  # type: ignore[no-untyped-call]  # ollama 0.6: close() is unannotated
            anonymous = ollama.AsyncClient(host=e.url)
            try:
                with pytest.raises(ollama.ResponseError) as refused:
                    await anonymous.generate(model=MODEL, prompt="why")
                assert refused.value.status_code == 401
            finally:
                await anonymous.close()  # type: ignore[no-untyped-call]  # ollama 0.6: close() is unannotated
            records = await e.records()
            assert [(r["status"], r["key"]) for r in records] == [
                (200, "sdk"),
                (401, None),
                (200, "sdk"),
                (401, None),
            ]
            await assert_no_secret(e, secrets, logs, caplog)


def test_keys_cli_add_list_revoke(tmp_path: Path, capsys: pytest.CaptureFixture[str]):
    path = str(tmp_path / "keys.json")
    args = ["keys", "--keys-path", path]
    limits = ["--rpm", "30", "--tpm", "5000", "--max-concurrency", "1", "--expires", "30d"]
    assert edge_main([*args, "add", "site-a", "--models", "llama3.2:1b", *limits]) == 0
    secret = capsys.readouterr().out.strip()
    assert secret.startswith("bh_") and len(secret) == 46
    assert edge_main([*args, "add", "site-a"]) == 1  # names are unique
    assert edge_main([*args, "add", "batch"]) == 0
    capsys.readouterr()
    assert edge_main([*args, "revoke", "batch"]) == 0
    assert edge_main([*args, "revoke", "nobody"]) == 1
    assert edge_main([*args, "list", "--json"]) == 0
    out = capsys.readouterr().out
    rows = json.loads(out)
    assert [(r["name"], r["state"]) for r in rows] == [("site-a", "active"), ("batch", "revoked")]
    assert rows[0]["rpm"] == 30 and rows[0]["models"] == ["llama3.2:1b"]
    assert rows[0]["max_concurrency"] == 1 and rows[0]["expires"]
    assert edge_main([*args, "list"]) == 0
    out += capsys.readouterr().out
    assert secret not in out and "sha256" not in out and "hash" not in out
    stored = read_keys_file(Path(path))
    assert [k.name for k in stored.keys] == ["site-a", "batch"]
    assert secret not in Path(path).read_text()
    assert (Path(path).stat().st_mode & 0o777) == 0o600
    # A keys file that cannot be written is a message and status 2, not a traceback.
    blocked = tmp_path / "a-file"
    blocked.touch()
    assert edge_main(["keys", "--keys-path", str(blocked / "keys.json"), "add", "x"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("backhaul-edge keys: ") and str(blocked) in err
