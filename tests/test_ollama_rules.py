"""The wire facts on their own: model names as Ollama reads them, cloud models, model lists and
usage figures (no network needed). The body built for upstream is tests/test_body_policy.py's."""

from __future__ import annotations

import pytest

from edge.models import ModelPolicy, canonical_model, is_cloud_model
from edge.proxy import usage
from edge.proxy.ollama import filter_models

OPEN = ModelPolicy([])


@pytest.mark.parametrize(
    ("name", "cloud"),
    [
        ("gpt-oss:120b-cloud", True),
        ("qwen3-coder:480b-cloud", True),
        ("kimi:cloud", True),
        # Ollama trims the name and lower-cases the tag before it looks for "cloud".
        ("gpt-oss:120b-CLOUD", True),
        ("gpt-oss:cloud ", True),
        (" kimi: Cloud", True),
        ("x:cloud:local", True),  # two sources: an error to Ollama, refused here
        ("llama3.2:1b", False),
        ("cloudy-model:7b", False),
        ("llama3.2", False),
        ("llama3.2:local", False),
        ("registry.local:5000/cloud", False),
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


@pytest.mark.parametrize(
    "spelling",
    [
        "llama3.2:1b",
        "LLAMA3.2:1B",  # Ollama matches each part of a name case-insensitively
        " llama3.2:1b\n",  # and trims it (Go's whitespace)
        "library/llama3.2:1b",  # the default namespace and registry
        "registry.ollama.ai/library/llama3.2:1b",
        "https://registry.ollama.ai/library/llama3.2:1b",
        "llama3.2:1b:local",  # an explicit local source is the same model
    ],
)
def test_spellings_of_one_model_are_one_model(spelling: str):
    assert canonical_model(spelling) == "llama3.2:1b"
    assert ModelPolicy(["llama3.2:1b"]).allows(spelling)


def test_other_names_stay_other():
    only = ModelPolicy(["llama3.2:1b"])
    for name in ("llama3.2:1b\x1c", "llama3.2:", "/llama3.2:1b", "team/llama3.2:1b", "llama3.2"):
        assert not only.allows(name), name
    # KELVIN SIGN and LONG S fold to k and s in Go's EqualFold, as in a JSON key.
    assert canonical_model("\u212aimi:2b-\u017fft") == "kimi:2b-sft"


def test_filter_models_keeps_only_allowed():
    policy = ModelPolicy(["a:1b"])
    tags = {"models": [{"name": "a:1b"}, {"name": "b:1b"}, {"name": "a:1b-cloud"}, "junk"]}
    kept = filter_models(tags, policy.allows)
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
