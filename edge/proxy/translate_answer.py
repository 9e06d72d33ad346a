"""An OpenAI-compatible cloud's answer in Ollama's shape (the cloud fallback, issue 13).

The way back for `edge.proxy.translate` (whose docstring holds the decisions and re-exports
everything here): a whole answer (`from_openai_json`), a stream (`SseToNdjson`) and an error
body (`error_message`). Pure: no I/O, and the clock is read only when the cloud's answer has no
`created` time.

What Ollama's shape cannot get from a cloud: its durations. `total_duration` is the caller's
wall clock for a whole answer and absent from a stream; `eval_duration` is never written, so
`edge.proxy.usage.Usage.server_speed` stays false and the edge labels its speed as measured by
itself, which is what it is. The counts come from `usage`, which a stream carries only because
`to_openai` asks for it (`stream_options.include_usage`).

A stream is read as SSE (lines cut anywhere by the transport, `data:` lines joined per event,
`:` comments and other fields skipped) and written as NDJSON, one line per piece of text. Tool
calls arrive in pieces (an index, then fragments of the arguments string) and Ollama sends each
call whole with its arguments an object, so they are gathered and sent in one message just
before the final `done: true` line. `finish_reason: tool_calls` is Ollama's `stop`.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import orjson

# The longest SSE line kept while waiting for its end: a chunk is one token's JSON, a few
# hundred bytes; a whole tool call sent in one chunk is rarely past a few KB.
MAX_LINE_BYTES = 1024 * 1024
# The most of a plain-text error body kept as its message.
_MAX_ERROR_CHARS = 500
_NS_PER_S = 1_000_000_000


class TranslationError(ValueError):
    """A cloud answer that cannot be said in Ollama's shape (the caller answers 502)."""


def from_openai_json(
    route_path: str, openai_body: Any, model_name: str, elapsed_s: float | None
) -> dict[str, Any]:
    """A whole non-streamed cloud answer as Ollama's answer on `route_path`.

    `model_name` is the name the client asked for; `elapsed_s` the caller's wall clock for
    the request (Ollama's `total_duration`), None when not measured.

    Error handling: `TranslationError` for a body that is not an answer (no choices or data,
    an `error` object in a 200, tool-call arguments that are not a JSON object).
    """
    if not isinstance(openai_body, dict):
        raise TranslationError("the cloud model server's answer is not a JSON object")
    if "error" in openai_body:
        raise TranslationError(_message_in(openai_body) or "the cloud model server failed")
    usage = openai_body.get("usage")
    usage = usage if isinstance(usage, dict) else {}
    if route_path in ("/api/embed", "/api/embeddings"):
        return _embeddings(route_path, openai_body, model_name, usage, elapsed_s)
    choices = openai_body.get("choices")
    if not isinstance(choices, list) or not choices or not isinstance(choices[0], dict):
        raise TranslationError("the cloud model server's answer has no choices")
    message = choices[0].get("message") or {}
    out = _piece(
        route_path == "/api/generate",
        model_name,
        _created_at(openai_body.get("created")),
        message.get("content") or message.get("refusal") or "",
        _reasoning(message),
    )
    calls = message.get("tool_calls")
    if calls and route_path == "/api/chat":
        out["message"]["tool_calls"] = [
            _ollama_call(n, c.get("id"), (c.get("function") or {}).get("name"), _args(c))
            for n, c in enumerate(calls)
        ]
    out["done"] = True
    out["done_reason"] = _done_reason(choices[0].get("finish_reason"))
    if elapsed_s is not None:
        out["total_duration"] = round(elapsed_s * _NS_PER_S)
    out.update(_counts(usage))
    return out


def error_message(openai_error_body: bytes) -> str:
    """The message of a cloud's error body, for Ollama's `{"error": "..."}`.

    Read from OpenAI's `{"error": {"message": ...}}`, a bare `{"error": "..."}`, FastAPI's
    `{"detail": ...}` (vLLM), a top-level `message`, or Gemini's list of one error object;
    anything else is the body's text, shortened.
    """
    try:
        obj = orjson.loads(openai_error_body)
    except orjson.JSONDecodeError:
        obj = None
    if isinstance(obj, list) and obj:
        obj = obj[0]
    if isinstance(obj, dict):
        found = _message_in(obj)
        if found:
            return found
    text = openai_error_body.decode("utf-8", errors="replace").strip()
    if not text:
        return "the cloud model server answered with an empty error"
    return text[:_MAX_ERROR_CHARS]


@dataclass(slots=True)
class _Call:
    id: str | None = None
    name: str = ""
    arguments: str = ""


class SseToNdjson:
    """One cloud stream (OpenAI's SSE) turned into Ollama's NDJSON as it arrives.

    `feed` takes bytes as the transport delivers them and returns the lines they complete,
    each ending in a newline; `finish` is called at the upstream's end. After the final line
    (`done: true`) or an error line (`{"error": ...}`), `done` is true and nothing more is
    written.
    """

    def __init__(self, route_path: str, model_name: str) -> None:
        self.done = False
        self._generate = route_path == "/api/generate"
        self._model = model_name
        self._partial = b""
        self._data: list[bytes] = []
        self._event = b""
        self._created_at: str | None = None
        self._calls: dict[int, _Call] = {}
        self._finish_reason: str | None = None
        self._usage: dict[str, Any] = {}

    def feed(self, data: bytes) -> list[bytes]:
        """The NDJSON lines that `data` completes."""
        if self.done:
            return []
        lines = (self._partial + data).split(b"\n")
        self._partial = lines.pop()
        out: list[bytes] = []
        for line in lines:
            out += self._line(line.removesuffix(b"\r"))
            if self._ended():
                return out
        if len(self._partial) > MAX_LINE_BYTES:
            out += self._error("the cloud model server sent a line too long to read")
        return out

    def finish(self) -> list[bytes]:
        """The lines left at the stream's end: its last event if unterminated, then the final
        line when the answer reached its finish, else an error line (the stream broke off)."""
        if self.done:
            return []
        out = self._line(self._partial.removesuffix(b"\r")) if self._partial else []
        self._partial = b""
        if not self._ended():
            out += self._line(b"")
        if self._ended():
            return out
        if self._finish_reason is None:
            return out + self._error("the cloud model server's stream ended before its answer")
        return out + self._end()

    def _ended(self) -> bool:
        return self.done  # a call, so a type checker does not hold `done` at its last test

    def _line(self, line: bytes) -> list[bytes]:
        if not line:
            data, event = b"\n".join(self._data), self._event
            self._data, self._event = [], b""
            return self._dispatch(data, event) if data else []
        if line.startswith(b":"):
            return []
        name, _, value = line.partition(b":")
        value = value.removeprefix(b" ")
        if name == b"data":
            self._data.append(value)
        elif name == b"event":
            self._event = value
        return []

    def _dispatch(self, data: bytes, event: bytes) -> list[bytes]:
        if data.strip() == b"[DONE]":
            return self._end()
        try:
            chunk = orjson.loads(data)
        except orjson.JSONDecodeError:
            return self._error("the cloud model server sent an unreadable event")
        if not isinstance(chunk, dict):
            return []
        if event == b"error" or "error" in chunk:
            return self._error(_message_in(chunk) or "the cloud model server failed")
        if self._created_at is None:
            self._created_at = _created_at(chunk.get("created"))
        usage = chunk.get("usage") or (chunk.get("x_groq") or {}).get("usage")
        if isinstance(usage, dict):
            self._usage = usage
        choices = chunk.get("choices")
        if not isinstance(choices, list) or not choices or not isinstance(choices[0], dict):
            return []
        choice = choices[0]
        if choice.get("finish_reason"):
            self._finish_reason = choice["finish_reason"]
        delta = choice.get("delta") or {}
        for n, call in enumerate(delta.get("tool_calls") or []):
            self._gather(n, call)
        text, reasoning = delta.get("content") or "", _reasoning(delta)
        if not text and not reasoning:
            return []
        piece = _piece(self._generate, self._model, self._created_at, text, reasoning)
        piece["done"] = False
        return [orjson.dumps(piece) + b"\n"]

    def _gather(self, n: int, delta: Any) -> None:
        if not isinstance(delta, dict):
            return
        index = delta.get("index", n)  # a call sent whole may come without its index
        call = self._calls.setdefault(index if isinstance(index, int) else n, _Call())
        call.id = delta.get("id") or call.id
        function = delta.get("function") or {}
        call.name = function.get("name") or call.name
        call.arguments += function.get("arguments") or ""

    def _end(self) -> list[bytes]:
        created_at = self._created_at or _created_at(None)
        out: list[bytes] = []
        if self._calls and not self._generate:
            try:
                calls = [
                    _ollama_call(n, c.id, c.name, _parse_args(c.arguments))
                    for n, c in enumerate(self._calls[i] for i in sorted(self._calls))
                ]
            except TranslationError as exc:
                return self._error(str(exc))
            piece = _piece(False, self._model, created_at, "", None)
            piece["message"]["tool_calls"] = calls
            piece["done"] = False
            out.append(orjson.dumps(piece) + b"\n")
        final = _piece(self._generate, self._model, created_at, "", None)
        final["done"] = True
        final["done_reason"] = _done_reason(self._finish_reason)
        final.update(_counts(self._usage))
        self.done = True
        return [*out, orjson.dumps(final) + b"\n"]

    def _error(self, message: str) -> list[bytes]:
        self.done = True
        return [orjson.dumps({"error": message}) + b"\n"]


def _piece(
    generate: bool, model: str, created_at: str | None, text: str, reasoning: str | None
) -> dict[str, Any]:
    """The start of one Ollama object: the model, the time and the text (with its thinking)."""
    out: dict[str, Any] = {"model": model, "created_at": created_at or _created_at(None)}
    if generate:
        out["response"] = text
        if reasoning:
            out["thinking"] = reasoning
    else:
        out["message"] = {"role": "assistant", "content": text}
        if reasoning:
            out["message"]["thinking"] = reasoning
    return out


def _embeddings(
    route_path: str,
    body: dict[str, Any],
    model_name: str,
    usage: dict[str, Any],
    elapsed_s: float | None,
) -> dict[str, Any]:
    data = body.get("data")
    if not isinstance(data, list) or not all(isinstance(d, dict) for d in data):
        raise TranslationError("the cloud model server's answer has no embeddings")
    vectors = [d.get("embedding") for d in sorted(data, key=lambda d: d.get("index", 0))]
    if route_path == "/api/embeddings":
        return {"embedding": vectors[0] if vectors else []}
    out: dict[str, Any] = {"model": model_name, "embeddings": vectors}
    if elapsed_s is not None:
        out["total_duration"] = round(elapsed_s * _NS_PER_S)
    if isinstance(usage.get("prompt_tokens"), int):
        out["prompt_eval_count"] = usage["prompt_tokens"]
    return out


def _ollama_call(n: int, call_id: Any, name: Any, arguments: dict[str, Any]) -> dict[str, Any]:
    """One tool call as Ollama sends it: its arguments an object, its id kept so the client
    can send it back with the result (`translate` matches results by it first)."""
    function = {"index": n, "name": name or "", "arguments": arguments}
    return {"id": call_id, "function": function} if call_id else {"function": function}


def _args(call: Any) -> dict[str, Any]:
    arguments = (call.get("function") or {}).get("arguments") if isinstance(call, dict) else None
    if isinstance(arguments, dict):
        return arguments
    return _parse_args(arguments if isinstance(arguments, str) else "")


def _parse_args(text: str) -> dict[str, Any]:
    try:
        arguments = orjson.loads(text) if text.strip() else {}
    except orjson.JSONDecodeError:
        arguments = None
    if not isinstance(arguments, dict):
        raise TranslationError("the cloud model's tool call arguments are not a JSON object")
    return arguments


def _reasoning(message: dict[str, Any]) -> str | None:
    """The thinking a cloud sends: `reasoning_content` (DeepSeek, vLLM), `reasoning`
    (OpenRouter, Groq, Ollama's own shim)."""
    value = message.get("reasoning_content") or message.get("reasoning")
    return value if isinstance(value, str) and value else None


def _done_reason(finish_reason: Any) -> str:
    if finish_reason in (None, "tool_calls", "function_call"):
        return "stop"
    return str(finish_reason)  # stop, length; others (content_filter) said as they are


def _counts(usage: dict[str, Any]) -> dict[str, int]:
    out: dict[str, int] = {}
    for theirs, ours in (
        ("prompt_tokens", "prompt_eval_count"),
        ("completion_tokens", "eval_count"),
    ):
        if isinstance(usage.get(theirs), int):
            out[ours] = usage[theirs]
    return out


def _created_at(created: Any) -> str:
    """Ollama's `created_at` (RFC 3339, UTC) from OpenAI's `created` (Unix seconds)."""
    seconds = created if isinstance(created, int | float) else time.time()
    stamp = datetime.fromtimestamp(seconds, UTC).isoformat(timespec="microseconds")
    return stamp.removesuffix("+00:00") + "Z"


def _message_in(obj: dict[str, Any]) -> str | None:
    error = obj.get("error")
    if isinstance(error, dict):
        error = error.get("message")
    for value in (error, obj.get("detail"), obj.get("message")):
        if isinstance(value, str) and value:
            return value
    return None
