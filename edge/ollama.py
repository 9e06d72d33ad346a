"""Wire facts about the model server's API: validating and sanitising request bodies, filtering
model lists (DESIGN.md §4 "Body sanitising").

Everything here is a pure function on parsed JSON, so it is tested without a network. The facts
behind each rule (which options force a reload, what `_debug_render_only` does, why `*-cloud`
models are refused) are in ../shared/research/gateway-anchors.md §1.4.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from edge.errors import Forbidden, InvalidRequest
from edge.routes import Kind, Route

# Options that Ollama applies only when it loads a model (api/types.go `Runner`): a caller that
# varies them forces a reload and evicts everyone else's warm model.
LOAD_TIME_OPTIONS = frozenset(
    {
        "num_ctx",
        "num_batch",
        "num_gpu",
        "main_gpu",
        "low_vram",
        "f16_kv",
        "logits_all",
        "vocab_only",
        "use_mmap",
        "use_mlock",
        "num_thread",
        "numa",
        "draft_num_predict",
    }
)
# Top-level fields nobody on the internet may set: `keep_alive` unloads the model for everyone.
DROPPED_FIELDS = frozenset({"keep_alive"})
# Fields of /api/show that reveal the owner's system prompts and templates.
SHOW_FIELDS_KEPT = ("details", "model_info", "capabilities", "modified_at")


@dataclass(frozen=True, slots=True)
class RequestFacts:
    """What the edge learned from a request body, for routing, limits and telemetry."""

    model: str | None
    stream: bool
    prompt_chars: int


class ModelPolicy:
    """Which models callers may use: an explicit list, or all but the `*-cloud` ones."""

    def __init__(self, allowed: list[str]) -> None:
        self._allowed = frozenset(canonical_model(m) for m in allowed)

    def allows(self, model: str) -> bool:
        name = canonical_model(model)
        if is_cloud_model(name):
            return False
        return not self._allowed or name in self._allowed


def canonical_model(name: str) -> str:
    """`llama3.2` and `llama3.2:latest` are the same model to Ollama.

    The tag is after a colon in the last path segment: `registry:5000/llama3` has none.
    """
    return name if ":" in name.rpartition("/")[2] else f"{name}:latest"


def is_cloud_model(name: str) -> bool:
    """Cloud models run on ollama.com, billed to the workstation owner's account."""
    tag = name.rpartition(":")[2]
    return tag == "cloud" or tag.endswith("-cloud")


def sanitise(route: Route, body: Any, policy: ModelPolicy, max_output_tokens: int) -> RequestFacts:
    """Check `body` for `route`, drop what callers may not set and cap output length, in place.

    Error handling: a body that is not what the route accepts raises `InvalidRequest`; a model
    outside the policy raises `Forbidden`. Nothing is sent upstream in either case.
    """
    if not isinstance(body, dict):
        raise InvalidRequest("the request body must be a JSON object")
    model = body.get("model")
    if not isinstance(model, str) or not model.strip():
        raise InvalidRequest("'model' is required and must be a non-empty string")
    if not policy.allows(model):
        raise Forbidden(f"model '{model}' is not allowed here")
    stream = body.get("stream", route.kind is Kind.GENERATE and not route.openai)
    if not isinstance(stream, bool):
        raise InvalidRequest("'stream' must be true or false")
    for name in list(body):
        if name in DROPPED_FIELDS or name.startswith("_"):
            del body[name]  # `_debug_render_only` returns the rendered system prompt
    options = body.get("options")
    if options is not None:
        if not isinstance(options, dict):
            raise InvalidRequest("'options' must be an object")
        for name in LOAD_TIME_OPTIONS.intersection(options):
            del options[name]
    if route.kind is Kind.GENERATE:
        _cap_output(route, body, max_output_tokens)
    return RequestFacts(model=model, stream=stream, prompt_chars=_prompt_chars(route, body))


def _cap_output(route: Route, body: dict[str, Any], cap: int) -> None:
    if route.openai:
        for name in ("max_tokens", "max_completion_tokens"):
            value = body.get(name)
            if value is not None and not _is_int(value):
                raise InvalidRequest(f"'{name}' must be an integer")
            if value is not None and value > cap:
                body[name] = cap
        if body.get("max_tokens") is None and body.get("max_completion_tokens") is None:
            body["max_tokens"] = cap
        return
    options = body.setdefault("options", {})
    value = options.get("num_predict")
    if value is not None and not _is_int(value):
        raise InvalidRequest("'options.num_predict' must be an integer")
    # Ollama reads -1 (and -2) as "until the context is full": an unbounded GPU bill.
    if value is None or value < 0 or value > cap:
        options["num_predict"] = cap


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _prompt_chars(route: Route, body: dict[str, Any]) -> int:
    total = 0
    for name in ("prompt", "system", "suffix", "input"):
        total += _text_chars(body.get(name), f"'{name}'")
    messages = body.get("messages")
    if messages is not None:
        if not isinstance(messages, list):
            raise InvalidRequest("'messages' must be a list")
        for message in messages:
            if not isinstance(message, dict):
                raise InvalidRequest("each message must be an object")
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


def filter_models(route: Route, body: Any, allows: Callable[[str], bool]) -> Any:
    """Remove the models `allows` refuses from a `/api/tags`, `/api/ps` or `/v1/models` body."""
    if not isinstance(body, dict):
        return body
    if route.openai:
        items = body.get("data")
        if isinstance(items, list):
            body["data"] = [m for m in items if _model_name(m, "id", allows)]
        return body
    items = body.get("models")
    if isinstance(items, list):
        body["models"] = [m for m in items if _model_name(m, "name", allows)]
    return body


def _model_name(item: Any, field: str, allows: Callable[[str], bool]) -> bool:
    name = item.get(field) if isinstance(item, dict) else None
    return isinstance(name, str) and allows(name)


def filter_show(body: Any) -> Any:
    """Keep only the parts of `/api/show` that do not reveal prompts, templates or licences."""
    if not isinstance(body, dict):
        return body
    return {name: body[name] for name in SHOW_FIELDS_KEPT if name in body}
