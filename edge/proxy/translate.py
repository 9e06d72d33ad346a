"""An Ollama-native request as an OpenAI-compatible cloud reads it (the cloud fallback, issue 13).

The edge serves `/api/chat`, `/api/generate`, `/api/embed` and `/api/embeddings` from a cloud
that speaks only OpenAI's API: `to_openai` turns the body the edge already sanitised
(`edge.proxy.body_policy`) into the cloud's, and names what it could not carry so the caller
logs it once (`translate.dropped`); the answer comes back through `edge.proxy.translate_answer`,
re-exported here so a caller imports one module. Everything is a pure function. Ollama's own
`/v1` shim (openai/openai.go) is the reference, read backwards; the table behind every rule is
../shared/research/turn2-scale-anchors.md §3.2.

Decisions, each with its reason:
- `/api/generate` goes to `/v1/chat/completions` too (`system` and `prompt` as two messages):
  Ollama applies the model's chat template to a generate prompt (`raw` is never sent), which is
  what a chat request does; OpenAI's `/v1/completions` is legacy, served there only by old
  instruct models, and absent from many clouds. Its `suffix` (fill-in-the-middle) has no chat
  counterpart and is dropped.
- The output cap goes into `max_tokens` by default: Groq, Together, OpenRouter, DeepSeek,
  Mistral, vLLM and llama.cpp read it, and OpenAI still honours it on every model but its
  reasoning ones, which need `max_completion_tokens` (`output_field` says so for such a cloud).
  One field, never both: a server that reads both picks one by its own rule.
- A schema in `format` is sent without `strict`: OpenAI's strict mode refuses any schema
  outside its subset (every property required, `additionalProperties: false`), which most
  Ollama schemas are; without it the schema still steers the answer.
- `think: true|false` is dropped (a cloud model reasons or not by its name); a level string
  (`"low"`, `"medium"`, `"high"`) becomes `reasoning_effort`.
- Tool-call ids: Ollama's history may carry none. A call without one gets `call_<m>_<n>` (its
  message's and its own position), so the same history gives the same ids on every turn (the
  cloud's prompt cache sees one prefix); a `role: tool` result is matched to the earliest
  unanswered call of its `tool_name` in the assistant message before it.
- `json_object` on OpenAI needs the word "json" in the messages; Ollama's docs tell callers to
  ask for JSON in the prompt anyway, so nothing is added to the prompt.
"""

from __future__ import annotations

import base64
import binascii
from typing import Any

import orjson

from edge.proxy.translate_answer import (
    SseToNdjson,
    TranslationError,
    error_message,
    from_openai_json,
)

__all__ = [
    "OPENAI_PATH",
    "SseToNdjson",
    "TranslationError",
    "error_message",
    "from_openai_json",
    "to_openai",
]

# The cloud route serving each Ollama route.
OPENAI_PATH = {
    "/api/chat": "/v1/chat/completions",
    "/api/generate": "/v1/chat/completions",
    "/api/embed": "/v1/embeddings",
    "/api/embeddings": "/v1/embeddings",
}
# Ollama options with the same name and meaning at OpenAI's top level.
_SAMPLING = ("temperature", "top_p", "seed", "stop", "frequency_penalty", "presence_penalty")
# Top-level fields `to_openai` reads itself, per route; any other one is dropped and named.
_READ = {
    "/api/chat": {"model", "stream", "options", "format", "think", "messages", "tools"},
    "/api/generate": {"model", "stream", "options", "format", "think", "prompt", "system"},
    "/api/embed": {"model", "input", "dimensions", "options"},
    "/api/embeddings": {"model", "prompt", "options"},
}
# Message fields `_messages` reads itself; any other one (`thinking`) is dropped and named.
_MESSAGE_READ = frozenset({"role", "content", "images", "tool_calls", "tool_name", "tool_call_id"})
_REASONING_LEVELS = frozenset({"low", "medium", "high"})
# The first bytes of each image format a cloud accepts, for the data URL's media type.
_MAGIC = (
    (b"\x89PNG\r\n\x1a\n", "image/png"),
    (b"\xff\xd8\xff", "image/jpeg"),
    (b"GIF87a", "image/gif"),
    (b"GIF89a", "image/gif"),
)
# Base64 characters enough for the 12 bytes that name every format above (RIFF....WEBP).
_HEAD_CHARS = 16


def to_openai(
    route_path: str, body: dict[str, Any], model: str, *, output_field: str = "max_tokens"
) -> tuple[str, dict[str, Any], list[str]]:
    """The cloud's path and body for an Ollama-native request, and the fields dropped.

    `model` is the cloud's name for the model; `output_field` the field the cloud reads the
    output cap from (`max_completion_tokens` for OpenAI's reasoning models). Dropped fields are
    named as the client spelled them (`keep_alive`, `options.top_k`, `messages.thinking`),
    each once, in the order met.

    Error handling: `KeyError` for a route with no cloud counterpart; the caller routes only
    these four.
    """
    path = OPENAI_PATH[route_path]
    dropped: dict[str, None] = {}
    for name in body:
        if name not in _READ[route_path]:
            dropped[name] = None
    out: dict[str, Any] = {"model": model}
    if route_path in ("/api/embed", "/api/embeddings"):
        _embed(route_path, body, out, dropped)
        return path, out, list(dropped)
    if route_path == "/api/chat":
        out["messages"] = _messages(body.get("messages") or [], dropped)
        if body.get("tools"):
            out["tools"] = body["tools"]
    else:
        out["messages"] = _generate_messages(body)
    if body.get("stream", True) is not False:
        out["stream"] = True
        out["stream_options"] = {"include_usage": True}
    else:
        out["stream"] = False
    _options(body.get("options"), out, output_field, dropped)
    _format(body.get("format"), out, dropped)
    _think(body.get("think"), out, dropped)
    return path, out, list(dropped)


def _embed(
    route_path: str, body: dict[str, Any], out: dict[str, Any], dropped: dict[str, None]
) -> None:
    out["input"] = body.get("input" if route_path == "/api/embed" else "prompt", "")
    if body.get("dimensions") is not None:
        out["dimensions"] = body["dimensions"]
    out["encoding_format"] = "float"  # the answer is read as numbers, whatever the default
    for name in body.get("options") or {}:
        dropped[f"options.{name}"] = None


def _options(
    options: Any, out: dict[str, Any], output_field: str, dropped: dict[str, None]
) -> None:
    if not isinstance(options, dict):
        return
    for name, value in options.items():
        if name in _SAMPLING:
            out[name] = value
        elif name == "num_predict":
            if isinstance(value, int) and value > 0:  # -1 and -2 mean no cap in Ollama
                out[output_field] = value
        else:
            dropped[f"options.{name}"] = None


def _format(value: Any, out: dict[str, Any], dropped: dict[str, None]) -> None:
    if value == "json":
        out["response_format"] = {"type": "json_object"}
    elif isinstance(value, dict):
        out["response_format"] = {
            "type": "json_schema",
            "json_schema": {"name": "answer", "schema": value},
        }
    elif value not in (None, ""):
        dropped["format"] = None


def _think(value: Any, out: dict[str, Any], dropped: dict[str, None]) -> None:
    if value in _REASONING_LEVELS:
        out["reasoning_effort"] = value
    elif value is not None:
        dropped["think"] = None


def _generate_messages(body: dict[str, Any]) -> list[dict[str, Any]]:
    messages: list[dict[str, Any]] = []
    if body.get("system"):
        messages.append({"role": "system", "content": body["system"]})
    messages.append({"role": "user", "content": _content(body.get("prompt"), body.get("images"))})
    return messages


def _messages(history: list[Any], dropped: dict[str, None]) -> list[dict[str, Any]]:
    """Ollama's messages as OpenAI's: images as content parts, tool calls with ids and string
    arguments, tool results with the id of the call they answer."""
    out: list[dict[str, Any]] = []
    unanswered: list[tuple[str, str]] = []  # (id, name) of the last assistant's calls
    for m, message in enumerate(history):
        role = message.get("role")
        item: dict[str, Any] = {"role": role, "content": _content(message.get("content"), None)}
        if message.get("images"):
            item["content"] = _content(message.get("content"), message["images"])
        for name in message:
            if name not in _MESSAGE_READ:
                dropped[f"messages.{name}"] = None
        calls = message.get("tool_calls")
        if role == "assistant" and calls:
            item["tool_calls"] = [
                _call(call, f"call_{m}_{n}")
                for n, call in enumerate(calls)
                if isinstance(call, dict)
            ]
            unanswered = [(c["id"], c["function"]["name"]) for c in item["tool_calls"]]
            item["content"] = item["content"] or None
        elif role == "tool":
            item["tool_call_id"] = _answered(
                unanswered, message.get("tool_call_id"), message.get("tool_name"), m
            )
        out.append(item)
    return out


def _call(call: dict[str, Any], default_id: str) -> dict[str, Any]:
    function = call.get("function") or {}
    arguments = function.get("arguments")
    if not isinstance(arguments, str):
        arguments = orjson.dumps(arguments if arguments is not None else {}).decode()
    return {
        "id": call.get("id") or default_id,
        "type": "function",
        "function": {"name": function.get("name", ""), "arguments": arguments},
    }


def _answered(unanswered: list[tuple[str, str]], given: Any, name: Any, m: int) -> str:
    """The id of the call a tool result answers: its own, else the earliest unanswered call
    of `name` (of any name when it has none), taken off the list."""
    for i, (call_id, call_name) in enumerate(unanswered):
        if call_id == given or (not given and (name is None or call_name == name)):
            del unanswered[i]
            return call_id
    return given if isinstance(given, str) and given else f"call_{m}_result"


def _content(text: Any, images: Any) -> Any:
    text = text if isinstance(text, str) else ""
    if not images:
        return text
    parts: list[dict[str, Any]] = [{"type": "text", "text": text}] if text else []
    for image in images:
        url = f"data:{_media_type(image)};base64,{image}"
        parts.append({"type": "image_url", "image_url": {"url": url}})
    return parts


def _media_type(image: str) -> str:
    """The image's type from its first bytes; PNG when they name none (Ollama's reading of
    an image does not depend on it, a cloud's does)."""
    try:
        head = base64.b64decode(image[:_HEAD_CHARS])
    except (binascii.Error, ValueError):
        return "image/png"
    if head[:4] == b"RIFF" and head[8:12] == b"WEBP":
        return "image/webp"
    for magic, media_type in _MAGIC:
        if head.startswith(magic):
            return media_type
    return "image/png"
