"""The body sent upstream is built, not relayed: the rules hold in the model server's reading.

The unit tests drive `BodyPolicy.build` alone; the others send bodies through the real edge to
the real simulator, which decodes them as Ollama's Go server does (`simulator.gojson`),
and assert on what it decoded. The property test generates bodies the way an attacker would
write them (key casings, KELVIN SIGN and LONG S, duplicates, nested options, cloud spellings,
every output field, answer counts, long prompts) and checks whatever reached the model server.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import pytest
import structlog
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

from edge.errors import Forbidden, InvalidRequest
from edge.models import ModelPolicy, go_fold
from edge.proxy.body_policy import BodyPolicy
from edge.proxy.ollama import LOAD_TIME_OPTIONS
from edge.routes import BY_PATH
from edge.settings import EdgeSettings
from simulator.models import is_cloud, model_key
from simulator.serve import RunningSimulator
from tests.support.servers import Edge, edge, forwarded, simulator

LIMIT_S = 10.0
CAP = 50
POLICY = BodyPolicy(ModelPolicy(["llama3.2:1b"]), CAP)


def build(path: str, body: Any, policy: BodyPolicy = POLICY) -> dict[str, Any]:
    return policy.build(BY_PATH[path], body).body


def chat(**extra: Any) -> dict[str, Any]:
    return {"model": "llama3.2:1b", "messages": [{"role": "user", "content": "hi"}], **extra}


# -- the builder alone ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("path", "body", "named"),
    [
        ("/api/generate", {"MODEL": "qwen2.5:0.5b", "prompt": "x"}, "'MODEL'"),
        ("/api/generate", {"model": "llama3.2:1b", "Model": "qwen2.5:0.5b"}, "'Model'"),
        ("/api/generate", {"model": "llama3.2:1b", "KEEP_ALIVE": 0}, "'KEEP_ALIVE'"),
        ("/api/generate", {"model": "llama3.2:1b", "\u212aeep_alive": 0}, "\u212aeep_alive"),
        ("/api/generate", {"model": "llama3.2:1b", "\u017fystem": "x"}, "\u017fystem"),
        ("/api/generate", {"model": "llama3.2:1b", "Options": {"num_ctx": 1}}, "'Options'"),
        ("/api/generate", {"model": "llama3.2:1b", "PROMPT": "x"}, "'PROMPT'"),
        ("/api/generate", {"model": "llama3.2:1b", "IMAGES": []}, "'IMAGES'"),
        ("/api/generate", {"model": "llama3.2:1b", "Template": "{{range .}}"}, "'Template'"),
        ("/api/chat", {"model": "llama3.2:1b", "MESSAGES": []}, "'MESSAGES'"),
        ("/api/chat", chat(messages=[{"role": "user", "Content": "x"}]), "messages[].Content"),
        ("/api/chat", chat(messages=[{"role": "user", "IMAGES": ["a"]}]), "messages[].IMAGES"),
        ("/v1/chat/completions", chat(MAX_TOKENS=10**6), "'MAX_TOKENS'"),
        ("/v1/chat/completions", chat(N_Predict=-1), "'N_Predict'"),
        ("/v1/chat/completions", chat(stream_options={"Include_Usage": 1}), "Include_Usage"),
        ("/v1/completions", {"model": "llama3.2:1b", "Prompt": ["a", "b"]}, "'Prompt'"),
    ],
)
def test_a_key_that_aliases_a_field_is_refused_by_name(path: str, body: Any, named: str):
    with pytest.raises(InvalidRequest) as exc:
        build(path, body)
    assert named in exc.value.message and exc.value.status == 400


def test_fields_nobody_may_set_never_reach_the_body():
    body = {
        "model": " llama3.2:1b ",
        "prompt": "p",
        "template": "{{range .Messages}}{{range .Messages}}x{{end}}{{end}}",
        "raw": True,
        "context": [1, 2],
        "keep_alive": -1,
        "runner": {"num_ctx": 1},
        "_debug_render_only": True,
        "_anything": 1,
        "n_predict": -1,
        "unknown": "dropped",
        "options": {"num_ctx": 131072, "NUM_CTX": 1, "temperature": 0.5, "num_predict": -1},
    }
    assert build("/api/generate", body) == {
        "model": "llama3.2:1b",
        "prompt": "p",
        "options": {"temperature": 0.5, "num_predict": CAP},
    }


@pytest.mark.parametrize(
    ("asked", "sent"), [(None, CAP), (-1, CAP), (-2, CAP), (0, CAP), (10**9, CAP), (20, 20)]
)
def test_native_output_cap(asked: int | None, sent: int):
    options = {} if asked is None else {"num_predict": asked}
    body = build("/api/chat", chat(options=options))
    assert body["options"] == {"num_predict": sent}


@pytest.mark.parametrize(
    ("fields", "sent"),
    [
        ({}, CAP),
        ({"max_completion_tokens": 10**5}, CAP),  # the openai SDK's parameter, ignored by Ollama
        ({"max_completion_tokens": 7}, 7),
        ({"max_tokens": 9, "max_completion_tokens": 30}, 9),
        ({"n_predict": -1}, CAP),  # llama.cpp's alias, which wins over max_tokens there
        ({"n_predict": 5, "max_tokens": 40}, 5),
        ({"max_tokens": 0}, CAP),
    ],
)
def test_openai_output_cap_is_one_field(fields: dict[str, Any], sent: int):
    body = build("/v1/chat/completions", chat(**fields))
    assert body["max_tokens"] == sent
    assert not {"max_completion_tokens", "n_predict"} & set(body)


def test_answers_are_counted_and_share_the_cap():
    with pytest.raises(InvalidRequest, match=r"16 answers.*BACKHAUL_EDGE_MAX_CHOICES"):
        build("/v1/completions", {"model": "llama3.2:1b", "prompt": ["p"] * 8, "n": 2})
    for extra in ({"n": 2}, {"best_of": 3}, {"prompt": ["a", "b"]}):
        with pytest.raises(InvalidRequest, match="MAX_CHOICES"):
            build("/v1/completions", {"model": "llama3.2:1b", "prompt": "p", **extra})
    wide = BodyPolicy(ModelPolicy([]), 100, max_choices=8)
    body = build("/v1/completions", {"model": "m", "prompt": ["a", "b"], "n": 4}, wide)
    assert (body["max_tokens"], body["n"], body["prompt"]) == (12, 4, ["a", "b"])
    tokens = build("/v1/completions", {"model": "m", "prompt": [1, 2, 3], "n": 8}, wide)
    assert tokens["max_tokens"] == 12  # a list of token ids is one prompt
    with pytest.raises(InvalidRequest, match="'n' must be at least 1"):
        build("/v1/chat/completions", chat(n=0), wide)


@pytest.mark.parametrize(
    "model", ["gpt-oss:120b-CLOUD", "gpt-oss:cloud ", "kimi: Cloud", "x:cloud:local"]
)
def test_cloud_spellings_are_forbidden_even_with_no_allowlist(model: str):
    with pytest.raises(Forbidden):
        build("/v1/chat/completions", chat(model=model), BodyPolicy(ModelPolicy([]), CAP))


@pytest.mark.parametrize("model", ["qwen2.5:0.5b", "LLAMA3.2:1b-cloud", "llama3.2"])
def test_models_off_the_allowlist_are_forbidden(model: str):
    with pytest.raises(Forbidden):
        build("/api/chat", chat(model=model))
    assert build("/api/chat", chat(model="LLAMA3.2:1B "))["model"] == "LLAMA3.2:1B"


def test_messages_and_content_parts_are_rebuilt():
    message = {
        "role": "user",
        "content": [
            {"type": "text", "text": "hi", "cache_control": {}},
            {"type": "image_url", "image_url": {"url": "data:,", "x": 1}},
        ],
        "images": ["not an OpenAI field"],
    }
    body = build("/v1/chat/completions", chat(messages=[message]))
    assert body["messages"] == [
        {
            "role": "user",
            "content": [
                {"type": "text", "text": "hi"},
                {"type": "image_url", "image_url": {"url": "data:,"}},
            ],
        }
    ]
    with pytest.raises(InvalidRequest, match="content part"):
        build("/v1/chat/completions", chat(messages=[{"role": "user", "content": [{"x": 1}]}]))


def test_extra_fields_let_a_named_field_through():
    policy = BodyPolicy(ModelPolicy([]), CAP, extra_fields=["cache_prompt", "options.mirostat"])
    body = build(
        "/api/generate",
        {"model": "m", "cache_prompt": True, "other": 1, "options": {"mirostat": 2}},
        policy,
    )
    assert body == {
        "model": "m",
        "cache_prompt": True,
        "options": {"mirostat": 2, "num_predict": CAP},
    }
    for bad in ("keep_alive", "Template", "n_predict", "options.num_ctx", "_x", "max_Tokens"):
        with pytest.raises(ValidationError, match="extra field"):
            EdgeSettings(extra_fields=[bad])


def test_go_fold_is_encoding_json_s():
    assert go_fold("\u212aEEP_ALIVE") == "keep_alive" == go_fold("keep_alive")
    assert go_fold("\u017fTREAM") == "stream"
    # Dotless and dotted I fold to nothing ASCII in Go (checked with unicode.SimpleFold).
    assert go_fold("\u0131") != "i" and go_fold("\u0130") != "i"


# -- through the real edge to the simulator -------------------------------------------------


def decoded(sim: RunningSimulator, path: str) -> list[dict[str, Any]]:
    """What the simulator decoded, as Ollama's Go structs hold it, for each request to `path`."""
    return [r.decoded for r in sim.stats.requests if r.path == path and r.decoded is not None]


async def post(http: aiohttp.ClientSession, url: str, body: Any) -> tuple[int, Any]:
    data = body if isinstance(body, bytes) else orjson.dumps(body)
    headers = {"Content-Type": "application/json"}
    async with http.post(url, data=data, headers=headers) as r:
        return r.status, await r.json(content_type=None)


async def test_the_simulator_sees_only_what_the_edge_allowed(
    tmp_path: Path, http: aiohttp.ClientSession
):
    async with (
        simulator(reply_tokens=200) as sim,
        edge(sim.url, tmp_path, models=["llama3.2:1b"], max_output_tokens=CAP) as e,
    ):
        refused = [
            ("/api/generate", b'{"model":"llama3.2:1b","MODEL":"qwen2.5:0.5b","prompt":"x"}'),
            ("/api/generate", b'{"model":"llama3.2:1b","KEEP_ALIVE":0,"prompt":"x"}'),
            ("/api/generate", b'{"model":"llama3.2:1b","\\u212aeep_alive":0,"prompt":"x"}'),
            ("/api/chat", b'{"model":"llama3.2:1b","Options":{"num_ctx":131072},"messages":[]}'),
            ("/api/chat", b'{"model":"gpt-oss:120b-CLOUD","messages":[]}'),
            (
                "/v1/completions",
                b'{"model":"llama3.2:1b","prompt":["a","b","c","d","e","f","g","h"],"n":2}',
            ),
        ]
        for path, raw in refused:
            status, _ = await post(http, e.url + path, raw)
            assert status in (400, 403), raw
        assert forwarded(sim) == []

        # Each of these once relayed a field that lifted a limit in Ollama's reading.
        template = "{{range .Messages}}{{range .Messages}}{{.Content}}{{end}}{{end}}"
        raw = (
            b'{"model":"llama3.2:1b","prompt":"hi","stream":false,"options":{"num_predict":5},'
            b'"options":{"num_ctx":131072,"num_predict":-1},"template":"'
            + template.encode()
            + b'","raw":true,"context":[1,2,3],"keep_alive":0}'
        )
        status, answer = await post(http, e.url + "/api/generate", raw)
        assert status == 200 and answer["eval_count"] == CAP
        [seen] = decoded(sim, "/api/generate")
        assert seen["options"] == {"num_predict": CAP}
        assert not {"template", "raw", "context", "keep_alive"} & set(seen)

        for fields in ({"max_completion_tokens": 100_000}, {"n_predict": -1}):
            status, answer = await post(http, e.url + "/v1/chat/completions", chat(**fields))
            assert status == 200 and answer["usage"]["completion_tokens"] == CAP
        assert [d["max_tokens"] for d in decoded(sim, "/v1/chat/completions")] == [CAP, CAP]
        [*_, last] = [r for r in sim.stats.requests if r.path == "/v1/chat/completions"]
        assert set(last.body) == {"model", "messages", "max_tokens"}  # nothing else on the wire


async def test_casing_cannot_bypass_the_prompt_limits(tmp_path: Path, http: aiohttp.ClientSession):
    async with (
        simulator() as sim,
        edge(sim.url, tmp_path, max_prompt_chars=100, max_images=1) as e,
    ):
        long = "x" * 1000
        for body in (
            {"model": "llama3.2:1b", "prompt": "short", "PROMPT": long},
            {"model": "llama3.2:1b", "Prompt": long},
            chat(MESSAGES=[{"role": "user", "content": long}]),
            chat(messages=[{"role": "user", "content": "a", "Images": ["a", "b", "c"]}]),
            {
                "model": "llama3.2:1b",
                "prompt": "a",
                "\u0131mages": ["a", "b"],
                "images": ["a", "b"],
            },
        ):
            path = "/api/chat" if "messages" in body or "MESSAGES" in body else "/api/generate"
            status, answer = await post(http, e.url + path, body)
            assert status in (400, 413), (body, answer)
        assert decoded(sim, "/api/chat") == decoded(sim, "/api/generate") == []


# -- the property ---------------------------------------------------------------------------

MODELS = ["llama3.2:1b"]
MAX_CHOICES = 2
LIMITS = {"max_prompt_chars": 2000, "max_messages": 4, "max_images": 1}
OUTPUT_KEYS = ["max_tokens", "max_completion_tokens", "n_predict", "num_predict"]
NAMES = [
    "model", "prompt", "messages", "stream", "options", "keep_alive", "template", "raw",
    "context", "runner", "images", "system", "suffix", "n", "best_of", "stream_options",
    "_debug_render_only", *OUTPUT_KEYS, *OUTPUT_KEYS, "options", "options", "n", "model",
]  # fmt: skip
OPTION_NAMES = ["num_predict", "num_predict", "num_ctx", "num_gpu", "temperature", "use_mmap"]


def spellings(name: str) -> st.SearchStrategy[str]:
    """`name` as written, upper-cased, title-cased, or with k/s as KELVIN SIGN / LONG S."""
    odd = name.replace("k", "\u212a").replace("s", "\u017f")
    # Mostly as written: a body with an alias is refused whole, and the rest must be tried too.
    return st.sampled_from([name] * 27 + [name.upper(), name.title(), odd])


MODEL_NAMES = st.sampled_from(
    ["llama3.2:1b", "LLAMA3.2:1B", " llama3.2:1b", "qwen2.5:0.5b", "gpt-oss:120b-CLOUD",
     "gpt-oss:cloud ", "llama3.2:1b-cloud", "llama3.2:1b:local", "kimi:Cloud"]
)  # fmt: skip
INTS = st.one_of(st.integers(-3, 3 * CAP), st.integers(-3, 10**7))
NUMBERS = st.one_of(INTS, INTS, INTS, st.none(), st.sampled_from([1.5, True, "7"]))
TEXT = st.one_of(st.text(max_size=20), st.builds(lambda n: "w " * n, st.integers(0, 1500)))


def value_for(name: str) -> st.SearchStrategy[Any]:
    if name == "model":
        return MODEL_NAMES
    if name in OUTPUT_KEYS:
        return NUMBERS
    if name in ("n", "best_of"):
        return st.integers(-1, 3)
    if name == "options":
        keys = st.sampled_from(OPTION_NAMES).flatmap(spellings)
        return st.lists(st.tuples(keys, st.one_of(INTS, INTS, NUMBERS)), max_size=4).map(_Object)
    if name == "messages":
        message = st.lists(
            st.tuples(
                st.sampled_from(["role", "content", "content", "images"]).flatmap(spellings),
                st.one_of(TEXT, TEXT, TEXT, st.lists(st.just("aW1n"), max_size=3)),
            ),
            max_size=3,
        ).map(_Object)
        return st.lists(message, max_size=6)
    if name == "prompt":
        return st.one_of(TEXT, st.lists(TEXT, max_size=3))
    if name == "images":
        return st.lists(st.just("aW1n"), max_size=3)
    if name == "stream":
        return st.sampled_from([False, False, True, None])
    return st.one_of(TEXT, NUMBERS, st.booleans(), st.lists(st.integers(0, 9), max_size=3))


class _Object(list[tuple[str, Any]]):
    """A JSON object with its keys in order, duplicates kept: written by `dumps` below."""


def dumps(value: Any) -> bytes:
    if isinstance(value, _Object):
        return b"{" + b",".join(orjson.dumps(k) + b":" + dumps(v) for k, v in value) + b"}"
    if isinstance(value, list):
        return b"[" + b",".join(dumps(v) for v in value) + b"]"
    return orjson.dumps(value)


PAIRS = st.sampled_from(NAMES).flatmap(lambda name: st.tuples(spellings(name), value_for(name)))
BODIES = st.tuples(
    st.sampled_from(["/api/generate", "/api/chat", "/v1/chat/completions", "/v1/completions"]),
    st.lists(PAIRS, min_size=1, max_size=6),
)
# What most bodies start with, so that the generated keys after it meet the later checks.
BASE: dict[str, list[tuple[str, Any]]] = {
    "/api/generate": [("model", "llama3.2:1b"), ("prompt", "hi"), ("stream", False)],
    "/api/chat": [("model", "llama3.2:1b"), ("stream", False)],
    "/v1/chat/completions": [("model", "llama3.2:1b")],
    "/v1/completions": [("model", "llama3.2:1b"), ("prompt", "hi")],
}
MESSAGE = _Object([("role", "user"), ("content", "hi")])


@pytest.fixture
async def policy_servers(tmp_path: Path) -> AsyncIterator[tuple[RunningSimulator, Edge]]:
    async with (
        simulator(reply_tokens=3) as sim,
        edge(
            sim.url,
            tmp_path,
            models=MODELS,
            max_output_tokens=CAP,
            max_choices=MAX_CHOICES,
            **LIMITS,
        ) as e,
    ):
        yield sim, e


@settings(
    max_examples=150,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(case=BODIES)
async def test_whatever_the_body_the_model_server_reads_only_what_the_policy_allows(
    policy_servers: tuple[RunningSimulator, Edge],
    http: aiohttp.ClientSession,
    case: tuple[str, list[tuple[str, Any]]],
):
    sim, e = policy_servers
    path, pairs = case
    pairs = [*BASE[path], *pairs]
    if path.endswith("chat") or path.endswith("chat/completions"):
        pairs.insert(1, ("messages", [MESSAGE]))
    before = len(sim.stats.requests)
    with structlog.testing.capture_logs() as logs:
        async with asyncio.timeout(LIMIT_S):
            async with http.post(
                e.url + path,
                data=dumps(_Object(pairs)),
                headers={"Content-Type": "application/json"},
            ) as r:
                await r.read()
                status = r.status
    assert status < 500, status
    assert not [log for log in logs if log.get("exc_info") or log["log_level"] == "error"]
    for seen in sim.stats.requests[before:]:
        if seen.decoded is not None:
            assert_obeys_policy(seen.path, seen.decoded)


FORBIDDEN = {"keep_alive", "template", "raw", "context", "_debug_render_only"}


def text_chars(value: Any) -> int:
    if isinstance(value, str):
        return len(value)
    if isinstance(value, list):
        return sum(text_chars(v) for v in value)
    if isinstance(value, dict):
        return text_chars(value.get("text"))
    return 0


def assert_obeys_policy(path: str, seen: dict[str, Any]) -> None:
    """What Ollama would act on, checked against every rule of the edge."""
    model = seen.get("model", "")
    assert model_key(model) in {model_key(m) for m in MODELS} and not is_cloud(model), model
    assert not FORBIDDEN & {k for k, v in seen.items() if v not in (None, False, "", [])}, seen
    options = seen.get("options") or {}
    assert not LOAD_TIME_OPTIONS & set(options), options
    if path.startswith("/api/"):
        assert isinstance(options.get("num_predict"), int) and 0 < options["num_predict"] <= CAP
    else:
        prompts = seen.get("prompt")
        count = len(prompts) if isinstance(prompts, list) else 1
        answers = count * max(seen.get("n") or 1, seen.get("best_of") or 1)
        assert answers <= MAX_CHOICES
        assert seen["max_tokens"] > 0 and seen["max_tokens"] * answers <= CAP
    messages = seen.get("messages") or []
    assert len(messages) <= LIMITS["max_messages"]
    texts = [seen.get("prompt"), seen.get("system"), seen.get("suffix")]
    texts += [m.get("content") for m in messages if m]
    chars = sum(map(text_chars, texts))
    assert chars <= LIMITS["max_prompt_chars"]
    images = len(seen.get("images") or []) + sum(len(m.get("images") or []) for m in messages if m)
    assert images <= LIMITS["max_images"]
    assert {go_fold(k) for k in seen} == set(seen)  # Go's reading: canonical names only
