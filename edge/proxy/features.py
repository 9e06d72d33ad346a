"""Feature endpoints: `POST /features/{name}`, a pinned model and prompt behind a small API.

A public web page sends only `{"input": "..."}`; the edge's config (`[features.NAME]`, see
docs/features.md) pins everything else: the model, the system prompt, the prompt template
(`{input}` is the only placeholder), temperature and seed, an output cap and optionally a JSON
Schema for the answer. The request goes to the model server's `/api/chat` through the proxy's
own forwarding (`edge.proxy.handler.forward`, called by the route in `edge.proxy.feature_route`),
so the gate, the 503s, the figures and the telemetry line (with `feature` set) are the same as for
every other route.

The answer, non-streamed, is `{"output": ...}` with the X- headers: the text, or with a schema
the parsed JSON value, checked against the schema first (502 `invalid_model_output` if it does
not match: Ollama's `format` constrains sampling, but an answer cut off at the token cap is still
broken JSON). `?stream=1` relays Ollama's NDJSON chat stream as it comes; a feature with a
schema cannot stream, since its answer must be checked before any of it is sent.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import structlog
from aiohttp import web

from edge.routes import FEATURE_PREFIX
from edge.settings import EdgeSettings, FeatureSettings

log = structlog.get_logger(__name__)

PREFIX = FEATURE_PREFIX


@dataclass(frozen=True, slots=True)
class Feature:
    name: str
    config: FeatureSettings
    origins: frozenset[str]  # the edge's CORS origins and the feature's own
    validator: Any  # a jsonschema validator, or None when the answer is free text

    @property
    def model(self) -> str:
        return self.config.model

    @property
    def anonymous(self) -> bool:
        return self.config.anonymous

    @property
    def rpm(self) -> int | None:
        return self.config.rpm


FEATURE = web.RequestKey("feature", Feature)  # the feature a request is for, if any


def lookup(features: Mapping[str, Feature], path: str) -> Feature | None:
    """The feature a raw path names, if it is one (exact match, like the route allowlist)."""
    if not path.startswith(PREFIX):
        return None
    return features.get(path)


def build_features(settings: EdgeSettings) -> dict[str, Feature]:
    """The configured features by raw path (`/features/NAME`), validators compiled once."""
    features: dict[str, Feature] = {}
    for name, config in settings.features.items():
        validator = None
        if config.json_schema is not None:
            import jsonschema  # only when some feature has a schema: 50 ms of import

            cls = jsonschema.validators.validator_for(config.json_schema)
            validator = cls(config.json_schema)
        origins = frozenset(settings.cors_origins) | frozenset(config.cors_origins)
        features[PREFIX + name] = Feature(name, config, origins, validator)
    return features


def openai_chat_body(feature: Feature, text: str, max_output_tokens: int) -> dict[str, Any]:
    """The same call as `chat_body` for `/v1/chat/completions`, for a model server without
    Ollama's API (llama.cpp, vLLM): the schema as `response_format`, the cap as `max_tokens`."""
    native = chat_body(feature, text, False, max_output_tokens)
    options = native["options"]
    body: dict[str, Any] = {
        "model": native["model"],
        "messages": native["messages"],
        "stream": False,
        "max_tokens": options["num_predict"],
    }
    for name in ("temperature", "seed"):
        if name in options:
            body[name] = options[name]
    if feature.config.json_schema is not None:
        body["response_format"] = {
            "type": "json_schema",
            "json_schema": {"name": feature.name, "schema": feature.config.json_schema},
        }
    return body


def chat_body(feature: Feature, text: str, stream: bool, max_output_tokens: int) -> dict[str, Any]:
    """The `/api/chat` body for one call: everything pinned, the input in the user message."""
    config = feature.config
    messages = []
    if config.system:
        messages.append({"role": "system", "content": config.system})
    messages.append({"role": "user", "content": config.prompt.replace("{input}", text)})
    cap = min(config.max_tokens or max_output_tokens, max_output_tokens)
    options: dict[str, Any] = {"num_predict": cap}
    if config.temperature is not None:
        options["temperature"] = config.temperature
    if config.seed is not None:
        options["seed"] = config.seed
    body: dict[str, Any] = {
        "model": config.model,
        "messages": messages,
        "stream": stream,
        "options": options,
    }
    if config.json_schema is not None:
        body["format"] = config.json_schema
    return body
