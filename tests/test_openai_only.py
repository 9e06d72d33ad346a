"""An OpenAI-only model server behind the edge (llama.cpp's `llama-server`, vLLM): listings
filtered in every field they carry, Ollama routes that say what to use instead, and the model
server's own API key.

The two model servers here are small aiohttp apps that answer in their originals' exact shapes:
llama.cpp's tools/server (`server-http.cpp`: the 404 and 401 bodies, the API key checked before
routing with `/health`, `/models` and `/v1/models` public; `handle_models`: `/v1/models` with
llama.cpp's own `models` list beside OpenAI's `data`, the model named by its GGUF path when no
`--alias` is given) and vLLM's OpenAI server (`server_utils.AuthenticationMiddleware`: only
paths under `/v1` need the key, refused with `{"error": "Unauthorized"}`; FastAPI's 404
`{"detail": "Not Found"}`; `owned_by: "vllm"` in `/v1/models`).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from edge.upstreams.base import State
from shared.errors import ConfigError
from tests.support.keyfiles import assert_no_secret, bearer, captured_logs, keyed, write_keys
from tests.support.servers import edge, serving

GGUF = "/home/alice/models/SmolLM2-135M-Instruct.Q4_1.gguf"
FILE_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
LLAMA_404 = {"error": {"message": "File Not Found", "type": "not_found_error", "code": 404}}
LLAMA_401 = {"error": {"message": "Invalid API Key", "type": "authentication_error", "code": 401}}
LLAMA_PUBLIC = frozenset({"/health", "/v1/health", "/models", "/v1/models", "/"})

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def llama_models(name: str) -> dict[str, Any]:
    """llama.cpp's `/v1/models` for one model (tools/server `handle_models`)."""
    return {
        "models": [
            {
                "name": name,
                "model": name,
                "modified_at": "",
                "size": "",
                "digest": "",
                "type": "model",
                "description": "",
                "tags": [""],
                "capabilities": ["completion"],
                "parameters": "",
                "details": {
                    "parent_model": "",
                    "format": "gguf",
                    "family": "",
                    "families": [""],
                    "parameter_size": "",
                    "quantization_level": "",
                },
            }
        ],
        "object": "list",
        "data": [
            {
                "id": name,
                "object": "model",
                "created": int(time.time()),
                "owned_by": "llamacpp",
                "meta": {"vocab_type": 2, "n_vocab": 49152, "n_ctx_train": 8192, "n_embd": 576},
            }
        ],
    }


def chat_answer(model: str) -> dict[str, Any]:
    return {
        "choices": [
            {
                "finish_reason": "stop",
                "index": 0,
                "message": {"role": "assistant", "content": "Hello"},
            }
        ],
        "created": int(time.time()),
        "model": model,
        "object": "chat.completion",
        "usage": {"completion_tokens": 2, "prompt_tokens": 9, "total_tokens": 11},
        "id": "chatcmpl-x",
    }


Seen = list[tuple[str, str, str | None]]  # method, path, Authorization


def llama_server(model: str = GGUF, api_key: str | None = None) -> tuple[web.Application, Seen]:
    """A `llama-server -m MODEL [--api-key KEY]`; returns the app and the requests it saw."""
    seen: Seen = []

    @web.middleware
    async def server(request: web.Request, handler: Handler) -> web.StreamResponse:
        seen.append((request.method, request.path, request.headers.get("Authorization")))
        # llama.cpp checks the key before routing: an unknown path is 401 without it.
        if api_key is not None and request.path not in LLAMA_PUBLIC:
            given = request.headers.get("Authorization", "").removeprefix("Bearer ")
            if given != api_key:
                return web.json_response(LLAMA_401, status=401)
        try:
            return await handler(request)
        except web.HTTPNotFound:
            return web.json_response(LLAMA_404, status=404)

    async def models(request: web.Request) -> web.Response:
        return web.json_response(llama_models(model))

    async def chat(request: web.Request) -> web.Response:
        body = await request.json()
        return web.json_response(chat_answer(body.get("model", model)))

    app = web.Application(middlewares=[server])
    app.router.add_get("/v1/models", models)
    app.router.add_post("/v1/chat/completions", chat)
    return app, seen


async def test_llama_cpp_listing_is_filtered_in_both_lists(
    tmp_path: Path, http: aiohttp.ClientSession
):
    app, _ = llama_server()
    async with (
        serving(app) as url,
        edge(url, tmp_path, models=["llama3.2:1b"]) as e,
        http.get(f"{e.url}/v1/models") as r,
    ):
        assert r.status == 200
        listing = await r.json()
    # llama.cpp's own `models` list carried the refused model past a filter of `data` alone.
    assert listing["data"] == [] and listing["models"] == []


async def test_llama_cpp_model_path_is_listed_as_a_file_name_the_client_can_use(
    tmp_path: Path, http: aiohttp.ClientSession
):
    app, _ = llama_server()
    async with serving(app) as url, edge(url, tmp_path, models=[FILE_NAME]) as e:
        async with http.get(f"{e.url}/v1/models") as r:
            text = await r.text()
            listing = await r.json()
        assert "/home/alice" not in text
        assert [m["id"] for m in listing["data"]] == [FILE_NAME]
        assert [(m["name"], m["model"]) for m in listing["models"]] == [(FILE_NAME, FILE_NAME)]
        # What is listed is what may be asked for: the allowlist reads the same name.
        chat = {"model": listing["data"][0]["id"], "messages": [{"role": "user", "content": "hi"}]}
        async with http.post(f"{e.url}/v1/chat/completions", json=chat) as r:
            assert r.status == 200
            assert (await r.json())["model"] == FILE_NAME


async def test_vllm_model_path_is_kept_as_vllm_checks_it(
    tmp_path: Path, http: aiohttp.ClientSession
):
    # vLLM refuses any `model` but its served name, path and all: shortening it would break
    # every request, so only llama.cpp's listings are shortened.
    served = "/srv/models/Qwen2.5-0.5B-Instruct"

    async def models(request: web.Request) -> web.Response:
        entry = {"id": served, "object": "model", "created": 1, "owned_by": "vllm", "root": served}
        return web.json_response({"object": "list", "data": [entry]})

    app = web.Application()
    app.router.add_get("/v1/models", models)
    async with serving(app) as url, edge(url, tmp_path) as e, http.get(f"{e.url}/v1/models") as r:
        assert [m["id"] for m in (await r.json())["data"]] == [served]


async def test_ollama_routes_on_llama_cpp_name_the_openai_route(
    tmp_path: Path, http: aiohttp.ClientSession
):
    app, _ = llama_server()
    chat = {"model": FILE_NAME, "messages": [{"role": "user", "content": "hi"}], "stream": False}
    cases = [
        ("POST", "/api/chat", chat, "use /v1/chat/completions"),
        ("POST", "/api/generate", {"model": FILE_NAME, "prompt": "hi"}, "use /v1/completions"),
        ("POST", "/api/embed", {"model": FILE_NAME, "input": "hi"}, "use /v1/embeddings"),
        ("GET", "/api/tags", None, "use /v1/models"),
        ("GET", "/api/version", None, "it has no /api/version; use the /v1 routes"),
    ]
    async with serving(app) as url, edge(url, tmp_path) as e:
        for i, (method, path, body, advice) in enumerate(cases):
            headers = {"X-Request-Id": f"o{i}"}
            async with http.request(method, f"{e.url}{path}", json=body, headers=headers) as r:
                assert r.status == 404
                assert await r.json() == {
                    "error": f"this model server is OpenAI-compatible only: {advice}",
                    "type": "not_supported",
                    "request_id": f"o{i}",
                }
            record = await e.record(f"o{i}")
            assert (record["status"], record["type"]) == (404, "not_supported")


async def test_ollama_route_on_vllm_is_not_supported_but_ollamas_own_404_is_kept(
    tmp_path: Path, http: aiohttp.ClientSession
):
    async def fastapi_404(request: web.Request) -> web.Response:
        return web.json_response({"detail": "Not Found"}, status=404)

    async def model_not_found(request: web.Request) -> web.Response:
        return web.json_response({"error": "model 'x' not found"}, status=404)

    vllm = web.Application()
    vllm.router.add_route("*", "/{tail:.*}", fastapi_404)
    ollama = web.Application()
    ollama.router.add_post("/api/embed", model_not_found)
    body = {"model": "x", "input": "hi"}
    for upstream, expected in ((vllm, "not_supported"), (ollama, None)):
        async with (
            serving(upstream) as url,
            edge(url, tmp_path) as e,
            http.post(f"{e.url}/api/embed", json=body) as r,
        ):
            assert r.status == 404
            payload = await r.json()
        if expected is None:  # Ollama's own word on the request
            assert payload == {"error": "model 'x' not found"}
        else:
            assert payload["type"] == expected
            assert payload["error"].endswith("use /v1/embeddings")


VLLM_KEY = "vllm-0123456789abcdef0123456789abcdef"
SERVED = "Qwen/Qwen2.5-0.5B-Instruct"
CHAT = {"model": SERVED, "messages": [{"role": "user", "content": "hi"}]}


def vllm_server(api_key: str | None) -> tuple[web.Application, Seen]:
    """`vllm serve Qwen/Qwen2.5-0.5B-Instruct [--api-key KEY]`: the key is checked on paths
    under /v1 only; returns the app and the requests it saw."""
    seen: Seen = []

    @web.middleware
    async def server(request: web.Request, handler: Handler) -> web.StreamResponse:
        seen.append((request.method, request.path, request.headers.get("Authorization")))
        given = request.headers.get("Authorization")
        if api_key is not None and request.path.startswith("/v1") and given != f"Bearer {api_key}":
            return web.json_response({"error": "Unauthorized"}, status=401)
        try:
            return await handler(request)
        except web.HTTPNotFound:
            return web.json_response({"detail": "Not Found"}, status=404)

    async def models(request: web.Request) -> web.Response:
        entry = {"id": SERVED, "object": "model", "created": 1, "owned_by": "vllm", "root": SERVED}
        return web.json_response({"object": "list", "data": [entry]})

    async def chat(request: web.Request) -> web.Response:
        return web.json_response(chat_answer((await request.json())["model"]))

    app = web.Application(middlewares=[server])
    app.router.add_get("/v1/models", models)
    app.router.add_post("/v1/chat/completions", chat)
    return app, seen


async def test_the_model_servers_key_is_sent_and_the_callers_never(
    tmp_path: Path, http: aiohttp.ClientSession
):
    key_file = tmp_path / "vllm.key"
    key_file.write_text(VLLM_KEY + "\n")
    secrets = write_keys(tmp_path / "keys.json", alice={})
    app, seen = vllm_server(VLLM_KEY)
    settings = keyed(tmp_path, upstream_api_key_file=key_file)
    with captured_logs() as logs:
        async with serving(app) as url, edge(url, tmp_path, **settings) as e:
            async with http.get(f"{e.url}/readyz") as r:
                assert r.status == 200
            headers = {**bearer(secrets["alice"]), "X-Request-Id": "keyed"}
            async with http.post(f"{e.url}/v1/chat/completions", json=CHAT, headers=headers) as r:
                assert r.status == 200
            assert (await e.record("keyed"))["status"] == 200
            await assert_no_secret(e, {"upstream": VLLM_KEY, **secrets}, logs)
    # Every request and probe carried the edge's key, none the caller's.
    assert ("POST", "/v1/chat/completions", f"Bearer {VLLM_KEY}") in seen
    assert ("GET", "/v1/models", f"Bearer {VLLM_KEY}") in seen  # the probe
    assert {auth for _, _, auth in seen} == {f"Bearer {VLLM_KEY}"}


async def test_a_model_server_that_refuses_the_edge_is_not_ready_and_no_401_to_the_caller(
    tmp_path: Path, http: aiohttp.ClientSession
):
    # vLLM started with --api-key, the edge without it: /api/version is vLLM's 404 (no key is
    # checked there), so only a /v1 probe shows the refusal.
    app, seen = vllm_server(VLLM_KEY)
    async with serving(app) as url, edge(url, tmp_path) as e:
        async with http.get(f"{e.url}/readyz") as r:
            assert r.status == 502
            error = (await r.json())["error"]
        assert error["type"] == "upstream_refused"
        assert "refuses the edge's credential" in error["message"]
        assert "BACKHAUL_EDGE_UPSTREAM_API_KEY_FILE" in error["message"]
        headers = {"X-Request-Id": "refused", "Authorization": "Bearer the-callers-own"}
        async with http.post(f"{e.url}/v1/chat/completions", json=CHAT, headers=headers) as r:
            assert r.status == 502
            assert (await r.json())["error"]["type"] == "upstream_refused"
        record = await e.record("refused")
        assert (record["status"], record["type"]) == (502, "upstream_refused")
    assert all(auth is None for _, _, auth in seen)  # the caller's credential stayed at the edge


async def test_llama_cpp_refusing_a_wrong_key_is_seen_by_the_probe(
    tmp_path: Path, http: aiohttp.ClientSession
):
    key_file = tmp_path / "llama.key"
    key_file.write_text("not-the-key")
    app, seen = llama_server(api_key="the-key")
    async with (
        serving(app) as url,
        edge(url, tmp_path, upstream_api_key_file=key_file) as e,
        http.get(f"{e.url}/readyz") as r,
    ):
        assert r.status == 502
        assert (await r.json())["error"]["type"] == "upstream_refused"
        assert e.agent.monitor.status.state.value == "model_server_refuses"
    # llama.cpp checks its key before routing: the first probe's 401 said it all.
    assert seen[0] == ("GET", "/api/version", "Bearer not-the-key")


@pytest.mark.parametrize("content", [None, b"", b"two words", b"\xff\xfe"])
async def test_an_unusable_key_file_stops_the_edge_at_start(tmp_path: Path, content: bytes | None):
    key_file = tmp_path / "vllm.key"
    if content is not None:
        key_file.write_bytes(content)
    with pytest.raises(ConfigError, match="BACKHAUL_EDGE_UPSTREAM_API_KEY_FILE"):
        async with edge("http://127.0.0.1:9", tmp_path, upstream_api_key_file=key_file):
            pass


async def test_a_feature_speaks_openai_to_a_server_without_ollamas_api(
    tmp_path: Path, http: aiohttp.ClientSession
):
    """On llama.cpp or vLLM a feature calls /v1/chat/completions, the schema as
    `response_format` and the cap as `max_tokens`, and reads the OpenAI answer; streaming it
    (Ollama's NDJSON) is refused with what to do instead."""
    app, seen = llama_server()
    bodies: list[dict[str, Any]] = []

    @web.middleware
    async def keep(request: web.Request, handler: Handler) -> web.StreamResponse:
        if request.method == "POST":
            bodies.append(await request.json())
        return await handler(request)

    app.middlewares.append(keep)
    schema = {"type": "string"}
    feature = {"model": "SmolLM2", "prompt": "Say: {input}", "max_tokens": 8, "seed": 7}
    checked = {**feature, "json_schema": schema}
    async with (
        serving(app) as url,
        edge(url, tmp_path, features={"say": feature, "checked": checked}) as e,
    ):
        async with asyncio.timeout(5):
            await e.agent.monitor.wait_state(State.UP)
        async with http.post(f"{e.url}/features/say", json={"input": "hi"}) as r:
            assert r.status == 200
            assert await r.json() == {"output": "Hello"}
        async with http.post(f"{e.url}/features/checked", json={"input": "hi"}) as r:
            assert r.status == 502  # "Hello" is no JSON string: checked, as on Ollama
            assert (await r.json())["error"]["type"] == "invalid_model_output"
        async with http.post(f"{e.url}/features/say?stream=1", json={"input": "hi"}) as r:
            assert r.status == 404
            error = (await r.json())["error"]
            assert error["type"] == "not_supported" and "without ?stream=1" in error["message"]
    assert [p for m, p, _ in seen if m == "POST"] == ["/v1/chat/completions"] * 2
    plain, with_schema = bodies
    assert plain["max_tokens"] == 8 and plain["seed"] == 7 and plain["stream"] is False
    assert plain["messages"] == [{"role": "user", "content": "Say: hi"}]
    assert with_schema["response_format"] == {
        "type": "json_schema",
        "json_schema": {"name": "checked", "schema": schema},
    }
