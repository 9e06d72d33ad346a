"""Token and timing arithmetic for Ollama's and OpenAI's wire formats.

Ollama's final chunk carries `eval_count` (generated tokens) and `eval_duration` (nanoseconds of
decoding); tok/s is `eval_count / eval_duration * 1e9` (Ollama's documented formula). Metric fields
are omitted when zero, so every one is optional. OpenAI-style responses carry only token counts in
`usage`: speed is then measured by the caller from its own wall clock.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import orjson

NS_PER_S = 1_000_000_000


@dataclass(frozen=True, slots=True)
class Usage:
    """Token counts and, when the upstream reports them, its own durations."""

    prompt_tokens: int | None = None
    tokens: int | None = None  # generated (completion) tokens
    eval_ns: int | None = None  # decode time reported by the upstream
    total_ns: int | None = None

    def tok_per_s(self, wall_s: float | None = None) -> float | None:
        """Generation speed: from the upstream's own counters, else from `wall_s` if given."""
        if self.tokens is None:
            return None
        if self.eval_ns:
            return self.tokens * NS_PER_S / self.eval_ns
        if wall_s and wall_s > 0:
            return self.tokens / wall_s
        return None


def _int(value: Any) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def from_ollama(obj: dict[str, Any]) -> Usage:
    """Usage from an Ollama final object (`done: true`) or an `/api/embed` response."""
    return Usage(
        prompt_tokens=_int(obj.get("prompt_eval_count")),
        tokens=_int(obj.get("eval_count")),
        eval_ns=_int(obj.get("eval_duration")),
        total_ns=_int(obj.get("total_duration")),
    )


def from_openai(obj: dict[str, Any]) -> Usage:
    """Usage from an OpenAI response or usage chunk (`{"usage": {...}}`)."""
    usage = obj.get("usage")
    if not isinstance(usage, dict):
        return Usage()
    return Usage(
        prompt_tokens=_int(usage.get("prompt_tokens")),
        tokens=_int(usage.get("completion_tokens")),
    )


def from_body(body: bytes, openai: bool) -> Usage:
    """Usage from a whole non-streamed JSON body; an unparsable body gives an empty `Usage`."""
    try:
        obj = orjson.loads(body)
    except orjson.JSONDecodeError:
        return Usage()
    if not isinstance(obj, dict):
        return Usage()
    return from_openai(obj) if openai else from_ollama(obj)


def from_ndjson_tail(tail: bytes) -> Usage:
    """Usage from the last complete `done: true` line in the tail of an NDJSON stream."""
    for line in reversed(tail.split(b"\n")):
        if b'"done"' not in line:
            continue
        try:
            obj = orjson.loads(line)
        except orjson.JSONDecodeError:
            continue  # the tail may start mid-line
        if isinstance(obj, dict) and obj.get("done") is True:
            return from_ollama(obj)
    return Usage()


def from_sse_tail(tail: bytes) -> Usage:
    """Usage from the last `data:` event with a `usage` object in the tail of an SSE stream."""
    for event in reversed(tail.split(b"\n\n")):
        line = event.strip()
        if not line.startswith(b"data:") or b'"usage"' not in line:
            continue
        try:
            obj = orjson.loads(line[5:])
        except orjson.JSONDecodeError:
            continue
        if isinstance(obj, dict):
            usage = from_openai(obj)
            if usage.tokens is not None:
                return usage
    return Usage()
