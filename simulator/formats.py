"""JSON mode: what `format` and `response_format` ask of the simulator, and the text it answers.

Ollama constrains sampling with a grammar: `format: "json"` makes the reply a JSON object, a
JSON Schema in `format` an instance of the schema; the `/v1/chat/completions` shim maps
`response_format` onto `format` (`json_object` to "json", `json_schema` to its `schema`). The
model still stops at the output cap, so a capped answer is cut mid-JSON, as a real one is. This
module reads the request fields as Ollama does (`llm/server.go` Completion, `openai/openai.go`,
v0.12.6) and writes, deterministically, the JSON a model would produce, split into tokens.

The schema subset instantiated, the smallest valid instance of each: `const`; `enum` (the first
value); `anyOf`/`oneOf` (the first branch); local `$ref`s (`#/$defs/...`); `type` (of a list,
the first non-null one): `object` (the `required` properties only), `array` (its `prefixItems`,
then `items` up to `minItems`, at least one item when `maxItems` allows), `string` (a word of
the reply's vocabulary, padded to `minLength`, cut to `maxLength`), `integer` and `number`
(`minimum`, else above `exclusiveMinimum`, else 0 unless a maximum is below it), `boolean`
(true), `null`. With no `type`, a schema with `items` or `prefixItems` is an array, any other
an object. Other keywords (`pattern`, `format`, `allOf`, `additionalProperties`...) are ignored.
"""

from __future__ import annotations

import itertools
import math
import re
from collections.abc import Iterator
from typing import Any

import orjson

from simulator import wire

JSON = "json"  # `format: "json"`: any JSON object
MAX_DEPTH = 32  # schema levels followed; deeper (a required recursive $ref) is refused
# A token: a run of word characters, or of punctuation, with the whitespace before it. Joined,
# the tokens are the text again; `{"reply":"The quick"}` is `{"`, `reply`, `":"`, `The`,
# ` quick`, `"}`: about as many pieces as a BPE vocabulary makes of it.
_TOKEN = re.compile(r"\s*(?:[\w.+-]+|[^\s\w.+-]+)|\s+")


def native(value: Any) -> Any:
    """`format` as Ollama's runner reads it: None (free text), `JSON`, or a schema (a dict).

    Error handling: anything else is Ollama's 500 `invalid format` (raised, as there, only when
    something is to be generated: a load request ignores `format`).
    """
    if value is None or value == "":
        return None  # `null` and `""` are "set, but missing a value": not set
    if value == JSON or isinstance(value, dict):
        return value
    shown = orjson.dumps(value).decode().replace("\\", "\\\\").replace('"', '\\"')
    raise wire.WireError(
        500, f'invalid format: "{shown}"; expected "json" or a valid JSON Schema object'
    )


def openai(response_format: Any) -> Any:
    """`response_format` as the shim maps it onto `format` (not yet checked: `native` does)."""
    if not isinstance(response_format, dict):
        return None
    kind = response_format.get("type")
    kind = kind.strip().lower() if isinstance(kind, str) else ""
    if kind == "json_object":
        return JSON
    schema = response_format.get("json_schema")
    if kind == "json_schema" and isinstance(schema, dict):
        return schema.get("schema")
    return None  # "text", an unknown type, or json_schema without one: free text


def tokens(fmt: Any, reply_tokens: int) -> list[str]:
    """The whole reply under `fmt` (from `native`), as tokens: the usual words without one, in
    JSON mode `{"reply": <those words>}`, with a schema its smallest instance."""
    if fmt is None:
        return wire.reply(reply_tokens)
    if fmt == JSON:
        value: Any = {"reply": "".join(wire.reply(reply_tokens))}
    else:
        value = _Instance(fmt).of(fmt, 0)
    return _TOKEN.findall(orjson.dumps(value).decode())


class _Instance:
    """One schema's instance: resolves `$ref`s against the root, numbers the strings."""

    def __init__(self, root: dict[str, Any]) -> None:
        self._root = root
        self._words: Iterator[int] = itertools.count()

    def of(self, schema: Any, depth: int) -> Any:
        if depth > MAX_DEPTH:
            raise wire.WireError(
                500, f"the simulator follows JSON schemas {MAX_DEPTH} levels deep, no deeper"
            )
        if not isinstance(schema, dict):
            return {}  # `true`: anything goes
        if isinstance(ref := schema.get("$ref"), str):
            return self.of(self._resolve(ref), depth + 1)
        if "const" in schema:
            return schema["const"]
        for key in ("enum", "anyOf", "oneOf"):
            if isinstance(choices := schema.get(key), list) and choices:
                return choices[0] if key == "enum" else self.of(choices[0], depth + 1)
        kind = _kind(schema)
        if kind == "object":
            properties = schema.get("properties")
            properties = properties if isinstance(properties, dict) else {}
            required = schema.get("required")
            names = (
                [n for n in required if isinstance(n, str)] if isinstance(required, list) else []
            )
            return {name: self.of(properties.get(name, {}), depth + 1) for name in names}
        if kind == "array":
            prefix = schema.get("prefixItems")
            prefix = prefix if isinstance(prefix, list) else []
            most = _bound(schema, "maxItems")
            count = max(int(_bound(schema, "minItems") or 0), len(prefix), 1)
            count = count if most is None else min(count, int(most))
            each = prefix + [schema.get("items", {})] * (count - len(prefix))
            return [self.of(item, depth + 1) for item in each[:count]]
        if kind == "string":
            word = wire.WORDS[next(self._words) % len(wire.WORDS)]
            word = word.ljust(int(_bound(schema, "minLength") or 0), "o")
            most = _bound(schema, "maxLength")
            return word if most is None else word[: int(most)]
        if kind in ("integer", "number"):
            return _least(schema)
        if kind == "boolean":
            return True
        if kind == "null":
            return None
        raise wire.WireError(500, "invalid JSON schema in format")  # Ollama's words

    def _resolve(self, ref: str) -> Any:
        if not ref.startswith("#"):
            raise wire.WireError(500, f"the simulator resolves only local $refs, not {ref!r}")
        node: Any = self._root
        for part in filter(None, ref[1:].split("/")):
            part = part.replace("~1", "/").replace("~0", "~")
            if not isinstance(node, dict) or part not in node:
                raise wire.WireError(500, "invalid JSON schema in format")
            node = node[part]
        return node


def _kind(schema: dict[str, Any]) -> str:
    kind = schema.get("type")
    if isinstance(kind, list):
        kinds = [k for k in kind if k != "null"] or kind
        kind = kinds[0] if kinds else None
    if isinstance(kind, str):
        return kind
    return "array" if "items" in schema or "prefixItems" in schema else "object"


def _bound(schema: dict[str, Any], key: str) -> float | None:
    value = schema.get(key)
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    return value


def _least(schema: dict[str, Any]) -> int | float:
    """The smallest number the bounds allow, 0 when they allow it; whole where it can be."""
    if (low := _bound(schema, "minimum")) is not None:
        value = low
    elif (above := _bound(schema, "exclusiveMinimum")) is not None:
        value = math.floor(above) + 1
    else:
        high, below = _bound(schema, "maximum"), _bound(schema, "exclusiveMaximum")
        value = min(0, 0 if high is None else high, 0 if below is None else math.ceil(below) - 1)
    whole = math.ceil(value)
    return whole if schema.get("type") == "integer" or whole == value else value
