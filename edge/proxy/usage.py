"""Token and timing arithmetic for Ollama's and OpenAI's wire formats.

Ollama's final chunk carries `eval_count` (generated tokens) and `eval_duration` (nanoseconds of
decoding); tok/s is `eval_count / eval_duration * 1e9` (Ollama's documented formula). Metric fields
are omitted when zero, so every one is optional. OpenAI-style responses carry only token counts in
`usage`, except llama.cpp's, whose final answer (or last chunk) also carries its own `timings`:
`predicted_n` tokens decoded in `predicted_ms`, `predicted_per_second`, and `prompt_n` tokens
(`cache_n` more from its cache) read in `prompt_ms` (server-task.cpp, result_timings::to_json).
Where the upstream gives no timings, speed is measured by the caller from its own wall clock,
and the record says so (`speed_source`): a figure is the server's whenever it has one, because
the edge's clock also holds what the server did before decoding (its queue, the prompt) and,
for a buffered answer, cannot tell it apart.

A streamed OpenAI-style answer carries no usage at all unless the client asked for it with
`stream_options.include_usage` (the openai SDK does not by default), and a stream cut short never
reaches its final figures. For those the caller counts itself (`TokenCount`): one token per
chunk that carries generated text, which is how the model servers stream, and an estimate of
the prompt from its size (`estimate_prompt_tokens`).

Why count rather than ask the upstream for usage and drop the usage chunk before the client
sees it: the edge promises the client the upstream's stream unchanged, and asking changes more
than one chunk. Ollama's /v1/completions then puts `"usage"` (zeros) into every chunk
(middleware/openai.go, CompleteWriter), and llama.cpp moves its `timings` from the finish chunk
into the usage chunk (server-task.cpp, to_json_oaicompat_chat_stream), so dropping that chunk
would take them from a client that would otherwise have had them. Undoing either means
re-encoding chunks. The count is exact for completion tokens on those servers (one chunk per
token) and needs nothing from them; what it gives up is the exact prompt count, estimated
instead.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Any

import orjson

NS_PER_S = 1_000_000_000


@dataclass(frozen=True, slots=True)
class Usage:
    """Token counts and, when the upstream reports them, its own durations and speed."""

    prompt_tokens: int | None = None
    tokens: int | None = None  # generated (completion) tokens
    eval_ns: int | None = None  # decode time reported by the upstream
    total_ns: int | None = None
    prompt_ns: int | None = None  # prompt processing time reported by the upstream
    per_s: float | None = None  # decode speed the upstream reported itself (llama.cpp)

    @property
    def server_speed(self) -> bool:
        """Whether `tok_per_s()` is the upstream's own figure rather than a wall clock's."""
        return self.per_s is not None or (self.tokens is not None and bool(self.eval_ns))

    def tok_per_s(self, wall_s: float | None = None) -> float | None:
        """Generation speed: the upstream's own, else from its counters, else from `wall_s`."""
        if self.per_s is not None:
            return self.per_s
        if self.tokens is None:
            return None
        if self.eval_ns:
            return self.tokens * NS_PER_S / self.eval_ns
        if wall_s and wall_s > 0:
            return self.tokens / wall_s
        return None


def _int(value: Any) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def _positive(value: Any) -> float | None:
    """A finite number above zero, else None (llama.cpp writes a division by zero as null)."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    return float(value) if 0 < value < math.inf else None


def _ms_to_ns(value: Any) -> int | None:
    ms = _positive(value)
    return round(ms * 1_000_000) if ms is not None else None


def from_ollama(obj: dict[str, Any]) -> Usage:
    """Usage from an Ollama final object (`done: true`) or an `/api/embed` response."""
    return Usage(
        prompt_tokens=_int(obj.get("prompt_eval_count")),
        tokens=_int(obj.get("eval_count")),
        eval_ns=_int(obj.get("eval_duration")),
        total_ns=_int(obj.get("total_duration")),
        prompt_ns=_int(obj.get("prompt_eval_duration")),
    )


def from_openai(obj: dict[str, Any]) -> Usage:
    """Usage from an OpenAI response or chunk: its `usage`, and llama.cpp's `timings` if any.

    The counts come from `usage` when it is there; a llama.cpp stream without `include_usage`
    has only `timings`, whose `predicted_n` is the same count (`n_decoded`) and whose prompt is
    `prompt_n` read plus `cache_n` taken from the cache.
    """
    usage = obj.get("usage")
    if not isinstance(usage, dict):
        usage = {}
    timings = obj.get("timings")
    if not isinstance(timings, dict):
        timings = {}
    tokens = _int(usage.get("completion_tokens"))
    if tokens is None:
        tokens = _int(timings.get("predicted_n"))
    prompt = _int(usage.get("prompt_tokens"))
    read = _int(timings.get("prompt_n"))
    if prompt is None and read is not None and read >= 0:
        prompt = read + (_int(timings.get("cache_n")) or 0)
    return Usage(
        prompt_tokens=prompt,
        tokens=tokens,
        eval_ns=_ms_to_ns(timings.get("predicted_ms")),
        prompt_ns=_ms_to_ns(timings.get("prompt_ms")),
        per_s=_positive(timings.get("predicted_per_second")),
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
    """Usage from the last `data:` line with a `usage` or `timings` object in the tail of an
    SSE stream. Read line by line, not event by event: a comment line (`: ping`) or an
    `event:` line may share an event with the data, and a data line is always whole JSON."""
    for line in reversed(tail.split(b"\n")):
        if not line.startswith(b"data:") or (b'"usage"' not in line and b'"timings"' not in line):
            continue
        try:
            obj = orjson.loads(line[5:])
        except orjson.JSONDecodeError:
            continue  # the tail may start mid-line
        if isinstance(obj, dict):
            usage = from_openai(obj)
            if usage.tokens is not None:
                return usage
    return Usage()


# English text runs at about four characters per token with the tokenizers of the models served
# (Llama 3, Qwen, Gemma; OpenAI's rule of thumb too). Code and scripts without spaces take more
# tokens per character and the chat template adds a few per message, so the estimate errs low.
CHARS_PER_TOKEN = 4
# The longest line `TokenCount` keeps while waiting for its end: a streamed chunk is one token's
# JSON, a few hundred bytes (a finish chunk with usage and timings about 1 KB); the rest of a
# longer line is skipped, not buffered.
MAX_LINE_BYTES = 64 * 1024
# A field of generated text with a non-empty string value, or a non-empty list of tool calls:
# `content` (an OpenAI delta, an Ollama message), `text` (/v1/completions), `response` (Ollama's
# /api/generate), `reasoning` (Ollama's thinking on /v1), `reasoning_content` (llama.cpp's and
# vLLM's), `thinking` (Ollama's native). Sound on JSON: a `"` inside a string is always escaped,
# so `"content":"x` can only be that key and the start of its value; what a model generates
# can never forge it. `[ \t]`, not `\s`: a match never spans two lines.
_GENERATED = re.compile(
    rb'"(?:content|text|thinking|re(?:sponse|asoning(?:_content)?))"[ \t]*:[ \t]*"[^"\n]'
    rb'|"tool_calls"[ \t]*:[ \t]*\[[ \t]*\{'
)


def estimate_prompt_tokens(prompt_chars: int | None) -> int | None:
    """Prompt tokens estimated from the prompt's characters (`RequestRecord.prompt_chars`), for
    an answer whose upstream did not report them; None when the size is unknown."""
    if prompt_chars is None:
        return None
    return math.ceil(prompt_chars / CHARS_PER_TOKEN)


class TokenCount:
    """Generated tokens counted in a stream as it passes, whatever figures it carries.

    Each line (an SSE `data:` line, an NDJSON line) that carries generated text counts one
    token: Ollama and llama.cpp send one chunk per token on their OpenAI-compatible streams,
    and Ollama one line per token on its own (vLLM too, unless speculative decoding accepts
    several tokens at once). A chunk with only a role, a finish reason or usage counts nothing;
    the rare chunk that joins pieces held back (a partial stop sequence, an incomplete UTF-8
    character, a whole tool call at once on Ollama) counts one, so the count errs low.

    Lines are matched as bytes (`_GENERATED`), not parsed: about half the CPU of parsing each
    one with orjson and reading its fields (1.7 against 3.0 µs a chunk of Ollama's /v1 stream,
    measured in one run), which counts at one chunk per token. The transport cuts lines
    anywhere: the start of a line not yet ended is kept, at most `MAX_LINE_BYTES` of it.
    """

    __slots__ = ("_partial", "_skipping", "tokens")

    def __init__(self) -> None:
        self.tokens = 0
        self._partial = b""
        self._skipping = False  # inside a line longer than MAX_LINE_BYTES: until its end

    def feed(self, data: bytes) -> None:
        """Count the lines `data` completes; keep the start of the next one."""
        lines = data.split(b"\n")
        rest = lines.pop()  # after the last newline: the start of a line yet to end
        if lines:
            if self._skipping:  # the end of a line too long to keep: not counted
                lines[0], self._skipping = b"", False
            elif self._partial:
                lines[0] = self._partial + lines[0]
            self._partial = b""
            for line in lines:
                if _GENERATED.search(line):
                    self.tokens += 1
        if rest:
            self._keep(rest)

    def _keep(self, rest: bytes) -> None:
        if self._skipping:
            return
        if len(self._partial) + len(rest) > MAX_LINE_BYTES:
            self._partial, self._skipping = b"", True
        else:
            self._partial += rest
