"""The body rules on their own: what is dropped, capped, refused (no network needed)."""

from __future__ import annotations

from typing import Any

import pytest

from edge.errors import Forbidden, InvalidRequest
from edge.ollama import ModelPolicy, filter_models, is_cloud_model, sanitise
from edge.routes import BY_PATH
from shared import usage

OPEN = ModelPolicy([])


@pytest.mark.parametrize(
    ("name", "cloud"),
    [
        ("gpt-oss:120b-cloud", True),
        ("qwen3-coder:480b-cloud", True),
        ("kimi:cloud", True),
        ("llama3.2:1b", False),
        ("cloudy-model:7b", False),
        ("llama3.2", False),
    ],
)
def test_cloud_models(name: str, cloud: bool):
    assert is_cloud_model(name) is cloud
    assert OPEN.allows(name) is not cloud


def test_latest_tag_is_the_same_model():
    policy = ModelPolicy(["llama3.2"])
    assert policy.allows("llama3.2:latest") and policy.allows("llama3.2")
    assert not policy.allows("llama3.2:1b")
    # A registry with a port: the colon there is not a tag.
    registry = ModelPolicy(["registry.local:5000/team/llama3"])
    assert registry.allows("registry.local:5000/team/llama3:latest")
    assert not registry.allows("registry.local:5000/team/llama3:8b")


def test_native_output_cap_and_unlimited_requests():
    for asked, sent in ((None, 100), (-1, 100), (-2, 100), (10**9, 100), (20, 20)):
        body: dict[str, Any] = {"model": "m", "prompt": "p"}
        if asked is not None:
            body["options"] = {"num_predict": asked}
        sanitise(BY_PATH["/api/generate"], body, OPEN, 100)
        assert body["options"]["num_predict"] == sent


def test_openai_output_cap():
    body: dict[str, Any] = {"model": "m", "messages": [], "max_completion_tokens": 10**6}
    sanitise(BY_PATH["/v1/chat/completions"], body, OPEN, 100)
    assert body["max_completion_tokens"] == 100 and "max_tokens" not in body


def test_embeddings_are_not_capped_and_not_streamed():
    body: dict[str, Any] = {"model": "m", "input": ["a", "bb"], "keep_alive": "1h"}
    facts = sanitise(BY_PATH["/api/embed"], body, OPEN, 100)
    assert body == {"model": "m", "input": ["a", "bb"]}
    assert facts.stream is False and facts.prompt_chars == 3


def test_refusals():
    with pytest.raises(Forbidden):
        sanitise(BY_PATH["/api/chat"], {"model": "a:b-cloud"}, OPEN, 1)
    with pytest.raises(InvalidRequest):
        sanitise(BY_PATH["/api/chat"], {"model": " "}, OPEN, 1)


def test_filter_models_keeps_only_allowed():
    policy = ModelPolicy(["a:1b"])
    tags = {"models": [{"name": "a:1b"}, {"name": "b:1b"}, {"name": "a:1b-cloud"}, "junk"]}
    kept = filter_models(BY_PATH["/api/tags"], tags, policy.allows)
    assert kept == {"models": [{"name": "a:1b"}]}


def test_usage_from_stream_tails():
    ndjson = (
        b'{"response":"a","done":false}\n{"done":true,"eval_count":4,"eval_duration":2000000000}\n'
    )
    figures = usage.from_ndjson_tail(ndjson[5:])  # a tail that starts mid-line
    assert figures.tokens == 4 and figures.tok_per_s() == 2.0
    sse = (
        b'data: {"choices":[{"delta":{"content":"x"}}]}\n\n'
        b'data: {"choices":[],"usage":{"prompt_tokens":3,"completion_tokens":8}}\n\n'
        b"data: [DONE]\n\n"
    )
    figures = usage.from_sse_tail(sse)
    assert figures.tokens == 8 and figures.prompt_tokens == 3
    assert figures.tok_per_s() is None and figures.tok_per_s(wall_s=2.0) == 4.0
