"""Request bodies read the way Ollama reads them: Go's `encoding/json` into its request structs.

The edge's body rules must hold in the model server's reading of a body, so the simulator reads
as Ollama does rather than as Python does, and records what it read (`SeenRequest.decoded`):
- a key matches a struct field spelled exactly, else case-insensitively with Unicode simple
  folding (`foldName`: ASCII case, and the only two runes that fold to ASCII, U+212A KELVIN
  SIGN to k and U+017F LONG S to s); keys matching no field are ignored;
- when several keys match one field the last wins, decoded into what the field already holds:
  a repeated object merges into a map field (`options`) or a struct (`stream_options`), and a
  list decodes element by element over the list already there;
- `null` leaves a string, number or bool as it was, and empties a map, a list or a pointer;
- a map (`options`, and any `any` value) keeps its keys as written, the last of equal ones;
- a value of the wrong type is a 400, in Go's words.
Checked against Go 1.19's encoding/json. The structs are Ollama's api/types.go and
openai/openai.go ones, cut to the fields the simulator or the tests read; written here apart from
the edge's own tables (`edge.proxy.body_policy`) on purpose, so a mistake in one shows in the other.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

_FOLD = str.maketrans(
    {**{chr(c): chr(c + 32) for c in range(ord("A"), ord("Z") + 1)}, "\u212a": "k", "\u017f": "s"}
)
_INT64 = (-(2**63), 2**63 - 1)


class DecodeError(Exception):
    """The body does not decode into the route's struct: Ollama answers 400 with this."""


class _Object(list[tuple[str, Any]]):
    """A JSON object as its key-value pairs, in order, duplicates kept."""


@dataclass(frozen=True, slots=True)
class Scalar:
    go: str  # "string", "bool", "int", "float64"
    pointer: bool = False  # `*int`, `*bool`: null unsets it


@dataclass(frozen=True, slots=True)
class Struct:
    name: str
    fields: dict[str, Any]  # json tag -> type
    pointer: bool = False


@dataclass(frozen=True, slots=True)
class Slice:
    elem: Any


class MapAny:
    """`map[string]any`."""


class AnyValue:
    """`any` (and `json.RawMessage`): whatever the JSON is, objects last-key-wins."""


STRING, BOOL, INT, FLOAT = Scalar("string"), Scalar("bool"), Scalar("int"), Scalar("float64")
PBOOL, PINT, PFLOAT = Scalar("bool", True), Scalar("int", True), Scalar("float64", True)
ANY, MAP = AnyValue(), MapAny()

_MESSAGE = Struct(
    "Message",
    {
        "role": STRING,
        "content": STRING,
        "thinking": STRING,
        "images": Slice(ANY),
        "tool_calls": Slice(ANY),
        "tool_name": STRING,
        "tool_call_id": STRING,
    },
)
_OPENAI_MESSAGE = Struct(
    "Message",
    {"role": STRING, "content": ANY, "reasoning": STRING, "tool_calls": Slice(ANY), "name": STRING},
)
_STREAM_OPTIONS = Struct("StreamOptions", {"include_usage": BOOL}, pointer=True)
_RESPONSE_FORMAT = Struct(
    "ResponseFormat",
    {"type": STRING, "json_schema": Struct("JsonSchema", {"schema": ANY}, pointer=True)},
    pointer=True,
)
_NATIVE = {
    "model": STRING,
    "stream": PBOOL,
    "format": ANY,
    "keep_alive": ANY,
    "options": MAP,
    "think": ANY,
    "truncate": PBOOL,
    "shift": PBOOL,
    "_debug_render_only": BOOL,
    "logprobs": BOOL,
    "top_logprobs": INT,
}
_OPENAI = {
    "model": STRING,
    "stream": BOOL,
    "stream_options": _STREAM_OPTIONS,
    "max_tokens": PINT,
    "seed": PINT,
    "stop": ANY,
    "temperature": PFLOAT,
    "top_p": ANY,
    "_debug_render_only": BOOL,
    # Not in Ollama's structs (it ignores them), read as llama.cpp and vLLM do, so the tests
    # see how many answers and which prompt list an OpenAI-compatible server would be asked for.
    "n": PINT,
    "best_of": PINT,
}
STRUCTS: dict[str, Struct] = {
    "/api/generate": Struct(
        "GenerateRequest",
        {
            **_NATIVE,
            "prompt": STRING,
            "suffix": STRING,
            "system": STRING,
            "template": STRING,
            "context": Slice(INT),
            "raw": BOOL,
            "images": Slice(ANY),
        },
    ),
    "/api/chat": Struct(
        "ChatRequest", {**_NATIVE, "messages": Slice(_MESSAGE), "tools": Slice(ANY)}
    ),
    "/api/embed": Struct(
        "EmbedRequest",
        {
            "model": STRING,
            "input": ANY,
            "keep_alive": ANY,
            "truncate": PBOOL,
            "dimensions": INT,
            "options": MAP,
        },
    ),
    "/api/embeddings": Struct(
        "EmbeddingRequest",
        {"model": STRING, "prompt": STRING, "keep_alive": ANY, "options": MAP},
    ),
    "/api/show": Struct(
        "ShowRequest",
        {
            "model": STRING,
            "system": STRING,
            "template": STRING,
            "verbose": BOOL,
            "options": MAP,
            "name": STRING,
        },
    ),
    "/v1/chat/completions": Struct(
        "ChatCompletionRequest",
        {
            **_OPENAI,
            "messages": Slice(_OPENAI_MESSAGE),
            "tools": Slice(ANY),
            "response_format": _RESPONSE_FORMAT,
        },
    ),
    # Ollama's `prompt` is a string; `any` here, as llama.cpp and vLLM take lists too.
    "/v1/completions": Struct("CompletionRequest", {**_OPENAI, "prompt": ANY, "suffix": STRING}),
    "/v1/embeddings": Struct(
        "EmbedRequest",
        {"input": ANY, "model": STRING, "dimensions": INT, "encoding_format": STRING},
    ),
}


def fold(key: str) -> str:
    """Go's `foldName` for the ASCII field names of Ollama's structs (and `strings.EqualFold`,
    the same folding, for model names: simulator.models)."""
    return key.translate(_FOLD)


def parse(raw: bytes) -> Any:
    """`raw` as JSON with every object's pairs kept in order (`_Object`), duplicates too."""
    return json.loads(raw, object_pairs_hook=_Object)


def decode(path: str, parsed: Any) -> dict[str, Any] | None:
    """The request `parsed` (from `parse`) as Ollama's struct for `path` holds it: a dict by
    json tag of the fields set (None: no struct for this path)."""
    struct = STRUCTS.get(path)
    if struct is None:
        return None
    if not isinstance(parsed, _Object):
        raise DecodeError(
            f"json: cannot unmarshal {_kind(parsed)} into Go value of type {struct.name}"
        )
    value = _decode(parsed, struct, {}, struct.name)
    assert isinstance(value, dict)
    return value


def plain(value: Any) -> Any:
    """A parsed JSON value with its objects as dicts, the last of equal keys kept (Go's `any`)."""
    if isinstance(value, _Object):
        return {k: plain(v) for k, v in value}
    if isinstance(value, list):
        return [plain(v) for v in value]
    return value


_UNSET = object()


def _decode(value: Any, typ: Any, current: Any, where: str) -> Any:
    """`value` decoded into a Go value of type `typ` that holds `current` (or `_UNSET`)."""
    if isinstance(typ, AnyValue):
        return plain(value)
    if value is None:
        if isinstance(typ, Scalar | Struct) and not typ.pointer:
            return current  # null leaves a value as it was
        return _UNSET
    if isinstance(typ, Scalar):
        return _scalar(value, typ, where)
    if isinstance(typ, MapAny):
        if not isinstance(value, _Object):
            raise _type_error(value, "map[string]interface {}", where)
        merged = dict(current) if isinstance(current, dict) else {}
        merged.update((k, plain(v)) for k, v in value)
        return merged
    if isinstance(typ, Slice):
        if not isinstance(value, list) or isinstance(value, _Object):
            raise _type_error(value, "[]", where)
        old = current if isinstance(current, list) else []
        out = []
        for i, item in enumerate(value):
            held = old[i] if i < len(old) else _UNSET
            decoded = _decode(item, typ.elem, held, where)
            out.append(None if decoded is _UNSET else decoded)
        return out
    if not isinstance(value, _Object):
        raise _type_error(value, typ.name, where)
    fields = dict(current) if isinstance(current, dict) else {}
    folded = {fold(name): name for name in typ.fields}
    for key, item in value:
        name = key if key in typ.fields else folded.get(fold(key))
        if name is None:
            continue  # Go ignores a key that matches no field
        decoded = _decode(item, typ.fields[name], fields.get(name, _UNSET), f"{typ.name}.{name}")
        if decoded is _UNSET:
            fields.pop(name, None)
        else:
            fields[name] = decoded
    return fields


def _scalar(value: Any, typ: Scalar, where: str) -> Any:
    if typ.go == "string" and isinstance(value, str):
        return value
    if typ.go == "bool" and isinstance(value, bool):
        return value
    if typ.go == "int" and isinstance(value, int) and not isinstance(value, bool):
        if not _INT64[0] <= value <= _INT64[1]:
            raise DecodeError(
                f"json: cannot unmarshal number {value} into Go struct field {where} of type int"
            )
        return value
    if typ.go == "float64" and isinstance(value, int | float) and not isinstance(value, bool):
        return float(value)
    raise _type_error(value, typ.go, where)


def _type_error(value: Any, go: str, where: str) -> DecodeError:
    return DecodeError(
        f"json: cannot unmarshal {_kind(value)} into Go struct field {where} of type {go}"
    )


def _kind(value: Any) -> str:
    if isinstance(value, _Object):
        return "object"
    if isinstance(value, list):
        return "array"
    if isinstance(value, bool):
        return "bool"
    if isinstance(value, int | float):
        return "number"
    return "string"


def option_int(options: dict[str, Any], name: str) -> int | None:
    """An integer option as Ollama's `Options.FromMap` takes it: a JSON number, truncated (Go
    converts a float64 out of int64's range to its smallest value on amd64)."""
    value = options.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise DecodeError(f'option "{name}" must be of type integer')
    if isinstance(value, float) and value != value:
        return _INT64[0]
    number = int(value)
    return number if _INT64[0] <= number <= _INT64[1] else _INT64[0]
