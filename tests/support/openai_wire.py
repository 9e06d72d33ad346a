"""OpenAI's chat and embedding answers as the cloud stand-in (`tests.support.cloud`) sends them.

The shapes, field for field, of what api.openai.com returns, with deterministic content: an answer
told whole or in SSE chunks, usage, tool calls in fragments, unit vectors that depend only on the
text (as floats or base64 float32), so that the stand-in's module holds only its behaviour.
"""

from __future__ import annotations

import base64
import hashlib
import math
import struct
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import orjson

# Fixed so that answers compare equal between runs; OpenAI's own are Unix seconds too.
CREATED = 1_767_225_600


@dataclass
class ChatAnswer:
    """One chat answer, told whole (`completion`) or in chunks (`chunks`, `usage_chunk`)."""

    id: str
    model: str
    pieces: list[str]  # content words, or a tool call's argument fragments
    finish: str
    usage: dict[str, Any]
    tool: str | None  # the tool called, or None for text

    def head(self, kind: str) -> dict[str, Any]:
        return {
            "id": self.id,
            "object": kind,
            "created": CREATED,
            "model": self.model,
            "service_tier": "default",
            "system_fingerprint": "fp_standin",
        }

    def completion(self) -> dict[str, Any]:
        message: dict[str, Any] = {"role": "assistant", "content": None, "refusal": None}
        if self.tool is None:
            message["content"] = "".join(self.pieces)
        else:
            function = {"name": self.tool, "arguments": "".join(self.pieces)}
            message["tool_calls"] = [
                {"id": call_id(self.id), "type": "function", "function": function}
            ]
        choice = {"index": 0, "message": message, "logprobs": None, "finish_reason": self.finish}
        return {**self.head("chat.completion"), "choices": [choice], "usage": self.usage}

    def chunks(self) -> Iterator[dict[str, Any]]:
        """The role chunk, one per piece, then the one with `finish_reason`."""
        first: dict[str, Any] = {"role": "assistant", "content": "", "refusal": None}
        if self.tool is not None:
            function = {"name": self.tool, "arguments": ""}
            call = {"index": 0, "id": call_id(self.id), "type": "function", "function": function}
            first = {**first, "content": None, "tool_calls": [call]}
        yield self._chunk(first, None)
        for piece in self.pieces:
            delta: dict[str, Any] = {"content": piece}
            if self.tool is not None:
                delta = {"tool_calls": [{"index": 0, "function": {"arguments": piece}}]}
            yield self._chunk(delta, None)
        yield self._chunk({}, self.finish)

    def usage_chunk(self) -> dict[str, Any]:
        """The last chunk when the request asks for `stream_options.include_usage`: no choices."""
        return {**self.head("chat.completion.chunk"), "choices": [], "usage": self.usage}

    def _chunk(self, delta: dict[str, Any], finish: str | None) -> dict[str, Any]:
        choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}
        return {**self.head("chat.completion.chunk"), "choices": [choice]}


def call_id(answer_id: str) -> str:
    return "call_" + answer_id.removeprefix("chatcmpl-")


def tool_name(tool: Any) -> str:
    name = tool.get("function", {}).get("name") if isinstance(tool, dict) else None
    return name if isinstance(name, str) else "tool"


def argument_pieces(arguments: dict[str, Any]) -> list[str]:
    """A tool call's JSON arguments in fragments of 4 characters, as they stream."""
    text = orjson.dumps(arguments).decode()
    return [text[i : i + 4] for i in range(0, len(text), 4)]


def prompt_words(messages: Any) -> int:
    """The prompt's "tokens": its words, in string contents and text parts."""
    count = 0
    for message in messages if isinstance(messages, list) else []:
        content = message.get("content") if isinstance(message, dict) else None
        parts = content if isinstance(content, list) else [{"text": content}]
        for part in parts:
            text = part.get("text") if isinstance(part, dict) else None
            count += len(text.split()) if isinstance(text, str) else 0
    return count


def usage(prompt: int, completion: int) -> dict[str, Any]:
    return {
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": prompt + completion,
        "prompt_tokens_details": {"cached_tokens": 0, "audio_tokens": 0},
        "completion_tokens_details": {
            "reasoning_tokens": 0,
            "audio_tokens": 0,
            "accepted_prediction_tokens": 0,
            "rejected_prediction_tokens": 0,
        },
    }


def is_tokens(value: Any) -> bool:
    return isinstance(value, list) and all(isinstance(v, int) for v in value) and bool(value)


def vector(text: str | list[int], dims: int) -> list[float]:
    """A unit vector that depends only on the text."""
    seed = hashlib.sha256(orjson.dumps(text)).digest()
    raw = [(seed[i % len(seed)] + i) % 256 / 127.5 - 1.0 for i in range(dims)]
    norm = math.sqrt(sum(x * x for x in raw)) or 1.0
    return [x / norm for x in raw]


def as_base64(vector: list[float]) -> str:
    return base64.b64encode(struct.pack(f"<{len(vector)}f", *vector)).decode()


def sse_event(chunk: dict[str, Any]) -> bytes:
    return b"data: " + orjson.dumps(chunk) + b"\n\n"
