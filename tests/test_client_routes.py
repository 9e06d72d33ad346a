"""The routes real clients call besides the allowlist's own spellings: each served under the
same limits, or answered with a clear error."""

from __future__ import annotations

from pathlib import Path

import aiohttp
import openai
import pytest

from tests.support.keyfiles import bearer, keyed, write_keys
from tests.support.servers import edge, forwarded, simulator

MODEL = "llama3.2:1b"


async def test_openai_sdk_with_a_bare_base_url_and_models_retrieve(tmp_path: Path):
    """LiteLLM's `openai/` provider with `api_base=https://host` calls `/chat/completions`;
    the openai SDK's `models.retrieve` calls `/v1/models/{id}`."""
    async with (
        simulator(reply_tokens=5) as sim,
        edge(sim.url, tmp_path, models=[MODEL, "qwen2.5:0.5b"]) as e,
    ):
        bare = openai.AsyncOpenAI(base_url=e.url, api_key="unused", max_retries=0)
        async with bare:
            reply = await bare.chat.completions.create(
                model=MODEL, messages=[{"role": "user", "content": "hi"}], max_tokens=100_000
            )
            assert reply.usage is not None and reply.usage.completion_tokens == 5
            listed = [m.id async for m in bare.models.list()]
        assert MODEL in listed
        v1 = openai.AsyncOpenAI(base_url=f"{e.url}/v1", api_key="unused", max_retries=0)
        async with v1:
            one = await v1.models.retrieve(MODEL)
            assert one.id == MODEL
            with pytest.raises(openai.NotFoundError) as missing:
                await v1.models.retrieve("mistral:7b")  # the simulator has it; not allowed here
            assert "mistral:7b" in missing.value.message
            # The id is never part of an upstream path: a traversal is only a name not listed.
            async with aiohttp.ClientSession() as http:
                url = f"{e.url}/v1/models/..%2Fapi%2Fpull"
                async with http.get(url) as r:
                    assert r.status == 404
        assert set(forwarded(sim)) <= {
            "/api/version",
            "/v1/models",
            "/v1/chat/completions",
        }
        # The alias is the same route: the same body policy and output cap reached the server.
        [chat] = [s for s in sim.stats.requests if s.path == "/v1/chat/completions"]
        assert chat.body["max_tokens"] == 4096
        records = await e.records()
        assert [r["route"] for r in records[:2]] == ["/chat/completions", "/models"]
        assert records[-1]["status"] == 404 and records[-1]["type"] == "not_found"


async def test_root_answers_like_ollama_and_unserved_apis_say_what_to_use(
    tmp_path: Path, http: aiohttp.ClientSession
):
    secrets = write_keys(tmp_path / "keys.json", site={})
    async with simulator() as sim, edge(sim.url, tmp_path, **keyed(tmp_path)) as e:
        for method in ("GET", "HEAD"):  # a connection check: no key needed, nothing upstream
            async with http.request(method, f"{e.url}/") as r:
                assert r.status == 200
                assert (await r.text()) == ("Ollama is running" if method == "GET" else "")
        for path, instead in (("/v1/responses", "/v1/chat/completions"), ("/v1/messages", "")):
            body = {"model": MODEL, "input": "hi"}
            async with http.post(f"{e.url}{path}", json=body, headers=bearer(secrets["site"])) as r:
                assert r.status == 404
                error = (await r.json())["error"]
            assert error["type"] == "not_found" and path in error["message"]
            assert instead in error["message"]
            async with http.post(f"{e.url}{path}", json=body) as r:
                assert r.status == 401  # without a key, as every other path
        assert forwarded(sim) == []
