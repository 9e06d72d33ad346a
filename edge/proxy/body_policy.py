"""The body the edge sends upstream: built field by field from the client's, never relayed.

Why built: the model server reads JSON differently from the edge. Ollama decodes with Go's
`encoding/json`, which matches a key to a struct field case-insensitively (with Unicode simple
folding: `\\u212aeep_alive` is `keep_alive`), lets the last match win and merges repeated objects
into a map field; llama.cpp and vLLM read exact keys. A rule checked on the edge's own reading
of the client's bytes holds for the model server only if the model server reads the same thing,
so the edge sends its own serialisation of what it read: each field once, spelled exactly as the
server's struct names it, and nothing else.

The rules, per route (`SHAPES`, from Ollama's api/types.go and openai/openai.go structs):
- a field on the route's allowlist is copied (nested objects Go decodes into structs, such as
  messages and `stream_options`, are built the same way, level by level);
- a key that is not spelled exactly as a field but folds to one (`MODEL`, `Options`,
  `\\u212aeep_alive`, `max_Tokens`) is refused: 400 `invalid_request`, naming the key;
- the fields nobody may set (`NEVER`: `keep_alive`, `template`, `raw`, `context`, `runner`,
  every `_`-prefixed one, load-time options, server-specific output-length aliases) and every
  other unknown key are dropped; an operator can let a server-specific field through by name
  (`extra_fields`, top level or `options.NAME`);
- the output cap is one number sent in the one field the server reads (`options.num_predict`,
  or `max_tokens` on /v1: Ollama ignores `max_completion_tokens`, llama.cpp lets `n_predict`
  win), whatever field the client used, divided between the answers asked for (`n`, `best_of`,
  a prompt array), whose count is capped by `max_choices`.
Nothing is logged about what was dropped: it may be anything a client sends.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from edge.errors import Forbidden, InvalidRequest
from edge.models import GO_SPACE, ModelPolicy, go_fold
from edge.proxy.ollama import LOAD_TIME_OPTIONS
from edge.routes import Kind, Route

# Output-length fields: the client's ask is read from any of them, one is sent.
_OUTPUT_FIELDS = ("max_tokens", "max_completion_tokens", "n_predict")
# Never sent, at any level, whatever `extra_fields` says: they unload or reload the model,
# replace its template (a Go template Ollama executes: nested `range`s multiply the prompt),
# feed it raw token ids, or lift the output cap by another name (llama.cpp's `n_predict` and
# `n_cmpl`, `max_completion_tokens`, which the edge folds into `max_tokens`).
NEVER = frozenset(
    {"keep_alive", "template", "raw", "context", "runner", "_debug_render_only", "n_cmpl"}
    | set(_OUTPUT_FIELDS)
)


@dataclass(frozen=True, slots=True)
class Shape:
    """One JSON object level: its fields (a nested `Shape`, or None to copy the value as is)
    and the names it knows but never copies. `exact`: the server matches keys exactly here
    (Ollama reads `options` as a Go map), so a near-spelling reaches nothing and is only
    dropped."""

    fields: Mapping[str, Shape | None]
    never: frozenset[str] = frozenset()
    exact: bool = False
    folded: Mapping[str, str] = field(init=False)

    def __post_init__(self) -> None:
        known = {go_fold(name): name for name in (*self.never, *self.fields)}
        object.__setattr__(self, "folded", known)


def _shape(*names: str, never: Iterable[str] = (), **nested: Shape) -> Shape:
    fields: dict[str, Shape | None] = dict.fromkeys(names)
    fields.update(nested)
    return Shape(fields, NEVER | frozenset(never))


# api.Options without its Runner (load-time) part.
OPTIONS = Shape(
    dict.fromkeys(
        (
            "num_keep",
            "seed",
            "top_k",
            "top_p",
            "min_p",
            "typical_p",
            "repeat_last_n",
            "temperature",
            "repeat_penalty",
            "presence_penalty",
            "frequency_penalty",
            "stop",
        )
    ),
    never=LOAD_TIME_OPTIONS | {"num_predict"},  # num_predict: set by the cap
    exact=True,
)
_MESSAGE = _shape(
    "role", "content", "thinking", "images", "tool_calls", "tool_name", "tool_call_id"
)
_OPENAI_MESSAGE = _shape("role", "content", "reasoning", "tool_calls", "name", "tool_call_id")
_STREAM_OPTIONS = _shape("include_usage")
_NATIVE = ("model", "stream", "format", "think", "truncate", "shift", "logprobs", "top_logprobs")
_SAMPLING = ("seed", "stop", "temperature", "top_p", "frequency_penalty", "presence_penalty")

# Per route path: the request struct the server decodes the body into.
SHAPES: dict[str, Shape] = {
    "/api/generate": _shape(*_NATIVE, "prompt", "suffix", "system", "images", options=OPTIONS),
    "/api/chat": _shape(*_NATIVE, "tools", never=("messages",), options=OPTIONS),
    "/api/embed": _shape("model", "input", "truncate", "dimensions", options=OPTIONS),
    "/api/embeddings": _shape("model", "prompt", options=OPTIONS),
    # `name` is the deprecated spelling of `model`: one name to check is enough.
    "/api/show": _shape("model", never=("name", "system", "verbose", "options")),
    "/v1/chat/completions": _shape(
        "model",
        "stream",
        *_SAMPLING,
        "response_format",
        "tools",
        "reasoning",
        "reasoning_effort",
        "logprobs",
        "top_logprobs",
        never=("messages", "n", "best_of"),
        stream_options=_STREAM_OPTIONS,
    ),
    "/v1/completions": _shape(
        "model",
        "stream",
        *_SAMPLING,
        "suffix",
        "logprobs",
        never=("prompt", "n", "best_of"),
        stream_options=_STREAM_OPTIONS,
    ),
    "/v1/embeddings": _shape("model", "input", "dimensions", "encoding_format"),
}
# Lists of objects the server decodes into structs, built element by element (their names are
# in the route's `never`, so the copy leaves them to `BodyPolicy.build`).
_MESSAGES = {"/api/chat": _MESSAGE, "/v1/chat/completions": _OPENAI_MESSAGE}


def check_extra_fields(names: Iterable[str]) -> list[str]:
    """Validate the `extra_fields` setting: `NAME` or `options.NAME`, never a field the edge
    governs or one of its other spellings. Raises `ValueError` naming the first bad one."""
    names = list(names)
    for name in names:
        top, dot, sub = name.partition(".")
        level, key = (OPTIONS, sub) if dot else (None, top)
        if dot and top != "options":
            raise ValueError(f"extra field {name!r}: only top-level names and options.NAME")
        if not key or key.startswith("_"):
            raise ValueError(f"extra field {name!r}: not a field name")
        shapes = [level] if level is not None else [*SHAPES.values(), *_MESSAGES.values()]
        if any(go_fold(key) in shape.folded for shape in shapes):
            raise ValueError(f"extra field {name!r} is one the edge reads or refuses itself")
    return names


@dataclass(frozen=True, slots=True)
class RequestFacts:
    """What the edge learned from a request body, for routing, limits and telemetry."""

    model: str
    stream: bool
    prompt_chars: int


@dataclass(frozen=True, slots=True)
class Built:
    """The body to send upstream, and what the edge learned while building it."""

    body: dict[str, Any]
    facts: RequestFacts


class BodyPolicy:
    """Builds upstream bodies; made once from the settings."""

    def __init__(
        self,
        models: ModelPolicy,
        max_output_tokens: int,
        max_choices: int = 1,
        extra_fields: Iterable[str] = (),
    ) -> None:
        self.models = models
        self.max_output_tokens = max_output_tokens
        self.max_choices = max_choices
        extra = check_extra_fields(extra_fields)
        self._extra = frozenset(n for n in extra if "." not in n)
        self._extra_options = frozenset(n.partition(".")[2] for n in extra if "." in n)

    def build(self, route: Route, body: Any) -> Built:
        """The body to send for `route`, built from the client's `body`.

        Error handling: `InvalidRequest` (400) for a body the route does not accept, a key that
        aliases a field, or more answers than `max_choices`; `Forbidden` (403) for a model
        outside the policy. Nothing is sent upstream in either case.
        """
        if not isinstance(body, dict):
            raise InvalidRequest("the request body must be a JSON object")
        shape = SHAPES[route.path]
        out = _copy(body, shape, "", self._extra)
        model = body.get("model")
        if not isinstance(model, str) or not model.strip(GO_SPACE):
            raise InvalidRequest("'model' is required and must be a non-empty string")
        if not self.models.allows(model):
            raise Forbidden(f"model '{model}' is not allowed here")
        out["model"] = model.strip(GO_SPACE)  # Ollama trims it too; one spelling upstream
        stream = body.get("stream", route.kind is Kind.GENERATE and not route.openai)
        if not isinstance(stream, bool):
            raise InvalidRequest("'stream' must be true or false")
        if "options" in shape.fields:
            options = _object_or_none(body.get("options"), "'options'")
            if options is not None:
                out["options"] = _copy(options, OPTIONS, "options.", self._extra_options)
        messages = _MESSAGES.get(route.path)
        if messages is not None and "messages" in body:
            out["messages"] = _messages(body["messages"], messages, route.openai)
        if route.kind is Kind.GENERATE:
            if route.openai:
                self._cap_openai(route, body, out)
            else:
                self._cap_native(body, out)
        return Built(out, RequestFacts(out["model"], stream, _prompt_chars(out)))

    def _cap_native(self, body: dict[str, Any], out: dict[str, Any]) -> None:
        options = out.setdefault("options", {})
        asked = _int_or_none((body.get("options") or {}).get("num_predict"), "options.num_predict")
        # Ollama reads 0, -1 and -2 as "until the context is full": an unbounded GPU bill.
        cap = self.max_output_tokens
        options["num_predict"] = min(asked, cap) if asked is not None and asked > 0 else cap

    def _cap_openai(self, route: Route, body: dict[str, Any], out: dict[str, Any]) -> None:
        prompts = 1
        if route.path == "/v1/completions":
            prompt = body.get("prompt")
            prompts = _prompt_count(prompt)
            if prompt is not None:
                out["prompt"] = prompt
        n = _count(body, "n")
        best_of = _count(body, "best_of")
        answers = prompts * max(n or 1, best_of or 1)
        if answers > self.max_choices:
            raise InvalidRequest(
                f"the request asks for {answers} answers (prompts x n or best_of); the limit "
                f"is {self.max_choices} (BACKHAUL_EDGE_MAX_CHOICES)"
            )
        per_answer = self.max_output_tokens // answers
        if per_answer < 1:
            raise InvalidRequest(
                f"{answers} answers do not fit the {self.max_output_tokens}-token output cap "
                "(BACKHAUL_EDGE_MAX_OUTPUT_TOKENS)"
            )
        asks = [_int_or_none(body.get(name), name) for name in _OUTPUT_FIELDS]
        asked = min((a for a in asks if a is not None and a > 0), default=per_answer)
        out["max_tokens"] = min(asked, per_answer)
        if n is not None:
            out["n"] = n
        if best_of is not None:
            out["best_of"] = best_of


def _copy(obj: dict[str, Any], shape: Shape, where: str, extra: frozenset[str]) -> dict[str, Any]:
    """The fields of `obj` that `shape` copies as they are, aliases refused."""
    out: dict[str, Any] = {}
    for key, value in obj.items():
        if key in shape.fields:
            inner = shape.fields[key]
            if inner is None:
                out[key] = value
            elif (nested := _object_or_none(value, f"'{where}{key}'")) is not None:
                out[key] = _copy(nested, inner, f"{where}{key}.", frozenset())
        elif key in shape.never or key.startswith("_"):
            continue
        elif not shape.exact and go_fold(key) in shape.folded:
            known = shape.folded[go_fold(key)]
            raise InvalidRequest(
                f"'{where}{key}' is not a field name; the model server would read it as "
                f"'{where}{known}': spell it exactly"
            )
        elif key in extra:
            out[key] = value
    return out


def _messages(value: Any, shape: Shape, openai: bool) -> list[dict[str, Any]]:
    if not isinstance(value, list):
        raise InvalidRequest("'messages' must be a list")
    built = []
    for message in value:
        if not isinstance(message, dict):
            raise InvalidRequest("each message must be an object")
        out = _copy(message, shape, "messages[].", frozenset())
        if openai and isinstance(out.get("content"), list):
            out["content"] = [_content_part(part) for part in out["content"]]
        built.append(out)
    return built


def _content_part(part: Any) -> dict[str, Any]:
    """An OpenAI content part, rebuilt: a text or an image, the only two Ollama takes."""
    kind = part.get("type") if isinstance(part, dict) else None
    if kind == "text" and isinstance(part.get("text"), str):
        return {"type": "text", "text": part["text"]}
    if kind == "image_url" and "image_url" in part:
        image = part["image_url"]
        if isinstance(image, dict):
            image = {k: image[k] for k in ("url", "detail") if k in image}
        return {"type": "image_url", "image_url": image}
    raise InvalidRequest("a content part must be a text or an image_url")


def _object_or_none(value: Any, what: str) -> dict[str, Any] | None:
    if value is None or isinstance(value, dict):
        return value
    raise InvalidRequest(f"{what} must be an object")


def _int_or_none(value: Any, what: str) -> int | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        raise InvalidRequest(f"'{what}' must be an integer")
    return value


def _count(body: dict[str, Any], name: str) -> int | None:
    value = _int_or_none(body.get(name), name)
    if value is not None and value < 1:
        raise InvalidRequest(f"'{name}' must be at least 1")
    return value


def _prompt_count(prompt: Any) -> int:
    """How many prompts an OpenAI `prompt` holds: a string or a list of token ids is one; a
    list of strings or of token-id lists is one each."""
    if prompt is None or isinstance(prompt, str):
        return 1
    if not isinstance(prompt, list):
        raise InvalidRequest("'prompt' must be a string or a list")
    if prompt and all(isinstance(p, int) and not isinstance(p, bool) for p in prompt):
        return 1
    return max(len(prompt), 1)


def _prompt_chars(body: dict[str, Any]) -> int:
    total = 0
    for name in ("prompt", "system", "suffix", "input"):
        total += _text_chars(body.get(name), f"'{name}'")
    for message in body.get("messages") or ():
        total += _text_chars(message.get("content"), "message 'content'")
    return total


def _text_chars(value: Any, what: str) -> int:
    if value is None:
        return 0
    if isinstance(value, str):
        return len(value)
    if isinstance(value, list):  # OpenAI content parts, embedding input lists
        total = 0
        for part in value:
            if isinstance(part, str):
                total += len(part)
            elif isinstance(part, dict) and isinstance(part.get("text"), str):
                total += len(part["text"])
        return total
    raise InvalidRequest(f"{what} must be a string or a list")
