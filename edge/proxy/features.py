"""Feature endpoints: `POST /features/{name}`, a pinned model and prompt behind a small API.

A public web page sends only `{"input": "..."}`; the edge's config (`[features.NAME]`, see
docs/features.md) pins everything else: the model, the system prompt, the prompt template
(`{input}` is the only placeholder), temperature and seed, an output cap and optionally a JSON
Schema for the answer. The request goes to the model server's `/api/chat` through the proxy's
own forwarding (`proxy.forward`), so the gate, the 503s, the figures and the telemetry line (with
`feature` set) are the same as for every other route.

The answer, non-streamed, is `{"output": ...}` with the X- headers: the text, or with a schema
the parsed JSON value, checked against the schema first (502 `invalid_model_output` if it does
not match: Ollama's `format` constrains sampling, but an answer cut off at the token cap is still
broken JSON). `?stream=1` relays Ollama's NDJSON chat stream as it comes; a feature with a
schema cannot stream, since its answer must be checked before any of it is sent.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import orjson
import structlog
from aiohttp import web

from edge.errors import InvalidModelOutput, InvalidRequest, NotFound, PayloadTooLarge
from edge.exchange import EXCHANGE, Exchange
from edge.proxy import handler as proxy
from edge.routes import BY_PATH
from edge.settings import EdgeSettings, FeatureSettings
from edge.state import SETTINGS

log = structlog.get_logger(__name__)

PREFIX = "/features/"
CHAT = BY_PATH["/api/chat"]
# Bytes of request body per character of input allowed: JSON may escape a character as
# `\uXXXX` (6 bytes); plus room for the braces and the key.
_BYTES_PER_CHAR = 6
_BODY_SLACK = 1024
# Longest schema-error text sent back to the caller.
_MAX_DETAIL_CHARS = 300


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
FEATURES = web.AppKey("features", dict[str, Feature])  # by raw path, from `build()`


def setup(app: web.Application) -> None:
    """Add the configured features and their route to `app`."""
    app[FEATURES] = build(app[SETTINGS])
    app.router.add_post(PREFIX + "{name}", handle)


def lookup(app: web.Application, path: str) -> Feature | None:
    """The feature a raw path names, if it is one (exact match, like the route allowlist)."""
    if not path.startswith(PREFIX):
        return None
    return app[FEATURES].get(path)


def build(settings: EdgeSettings) -> dict[str, Feature]:
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


async def handle(request: web.Request) -> web.StreamResponse:
    """`POST /features/{name}`: read `{"input": ...}`, ask the pinned model, check, answer."""
    ex: Exchange = request[EXCHANGE]
    feature = request.get(FEATURE)
    if feature is None:
        raise NotFound("no such feature")
    stream = request.query.get("stream", "0") not in ("0", "false", "")
    if stream and feature.validator is not None:
        raise InvalidRequest(
            f"feature '{feature.name}' answers checked JSON, which cannot be streamed; "
            "call it without ?stream=1"
        )
    text = await _read_input(request, ex, feature)
    body = chat_body(feature, text, stream, request.app[SETTINGS].max_output_tokens)
    ex.route = CHAT
    ex.record.model, ex.record.stream = feature.model, stream
    ex.record.prompt_chars = sum(len(m["content"]) for m in body["messages"])
    response = await proxy.forward(request, ex, CHAT, orjson.dumps(body))
    if stream or not isinstance(response, web.Response) or response.status != 200:
        return response
    return _answer(ex, feature, response)


async def _read_input(request: web.Request, ex: Exchange, feature: Feature) -> str:
    limit = feature.config.max_input_chars
    max_bytes = limit * _BYTES_PER_CHAR + _BODY_SLACK
    too_large = PayloadTooLarge(
        f"the input is over feature '{feature.name}''s {limit}-character limit"
    )
    if request.content_length is not None and request.content_length > max_bytes:
        raise too_large
    raw = bytearray()
    async for chunk in request.content.iter_chunked(64 * 1024):
        raw += chunk
        if len(raw) > max_bytes:
            raise too_large
    ex.record.bytes_in = len(raw)
    try:
        obj = orjson.loads(raw)
    except orjson.JSONDecodeError:
        raise InvalidRequest('the body must be JSON: {"input": "..."}') from None
    if not isinstance(obj, dict) or set(obj) != {"input"}:
        raise InvalidRequest('the body must be exactly {"input": "..."}')
    text = obj["input"]
    if not isinstance(text, str) or not text.strip():
        raise InvalidRequest("'input' must be a non-empty string")
    if len(text) > limit:
        raise too_large
    return text


def _answer(ex: Exchange, feature: Feature, response: web.Response) -> web.Response:
    assert isinstance(response.body, bytes)
    try:
        content = orjson.loads(response.body)["message"]["content"]
    except (orjson.JSONDecodeError, KeyError, TypeError):
        content = None
    if not isinstance(content, str):
        raise InvalidModelOutput("the model server's answer has no message")
    output: Any = content
    if feature.validator is not None:
        output = _checked(ex, feature, content)
    response.body = orjson.dumps({"output": output})
    ex.record.bytes_out = len(response.body)
    return response


def _checked(ex: Exchange, feature: Feature, content: str) -> Any:
    try:
        value = orjson.loads(content)
    except orjson.JSONDecodeError:
        log.warning(
            "feature.invalid_output", feature=feature.name, request_id=ex.id, problem="not JSON"
        )
        raise InvalidModelOutput("the model's answer is not valid JSON") from None
    error = next(iter(feature.validator.iter_errors(value)), None)
    if error is not None:
        where = "/".join(str(p) for p in error.absolute_path) or "(root)"
        log.warning(
            "feature.invalid_output",
            feature=feature.name,
            request_id=ex.id,
            problem="schema",
            at=where,
        )
        detail = f"at {where}: {error.message}"[:_MAX_DETAIL_CHARS]
        raise InvalidModelOutput(f"the model's answer does not match the schema {detail}")
    return value
