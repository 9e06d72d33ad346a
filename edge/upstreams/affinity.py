"""Prompt-cache affinity: the turns of one conversation go to the agent that served the first.

A model server keeps the last prompts it processed in its KV cache (llama.cpp's slots, Ollama's
runner cache), so the next turn of a conversation, which repeats the whole conversation so far,
costs only its new part there, and all of it anywhere else. So the pool remembers which agent
answered a conversation and prefers it for the next turn (after agents with a free slot and the
model loaded: the cache is worth less than a wait).

A conversation is known by what does not change between its turns: the caller (its API key, or
its address), the model, and the start of its first messages (a system prompt and the first user
message, 512 bytes: Olla's and SGLang's shape), or the caller's own `X-Backhaul-Session` header.
The table is bounded (least recently used out first) and entries expire, as Olla's (10,000
entries, 600 s).
"""

from __future__ import annotations

import hashlib
import time
from collections import OrderedDict
from typing import Any

import orjson

# A caller's own name for its conversation, instead of its first messages.
SESSION_HEADER = "X-Backhaul-Session"
# Bytes of the conversation's start that name it.
PREFIX_BYTES = 512
ENTRIES = 10_000
TTL_S = 600.0


def conversation_key(caller: str, model: str | None, body: Any, session: str | None) -> str | None:
    """The conversation a request belongs to, or None when it shows none (no messages, no
    prompt, no session header)."""
    start = session.encode()[:PREFIX_BYTES] if session else _start(body)
    if start is None:
        return None
    digest = hashlib.blake2b(digest_size=12)
    for part in (caller.encode(), b"\0", (model or "").encode(), b"\0", start):
        digest.update(part)
    return digest.hexdigest()


def _start(body: Any) -> bytes | None:
    if not isinstance(body, dict):
        return None
    messages = body.get("messages")
    if isinstance(messages, list) and messages:
        first = messages[:2] if _role(messages[0]) == "system" else messages[:1]
        return orjson.dumps(first)[:PREFIX_BYTES]
    prompt = body.get("prompt")
    if isinstance(prompt, str) and prompt:
        return prompt.encode()[:PREFIX_BYTES]
    return None


def _role(message: Any) -> Any:
    return message.get("role") if isinstance(message, dict) else None


class Affinity:
    """Conversation key -> the name of the agent that last answered it."""

    def __init__(self, entries: int = ENTRIES, ttl: float = TTL_S) -> None:
        self._entries = entries
        self._ttl = ttl
        self._table: OrderedDict[str, tuple[str, float]] = OrderedDict()

    def __len__(self) -> int:
        return len(self._table)

    def get(self, key: str | None) -> str | None:
        if key is None:
            return None
        entry = self._table.get(key)
        if entry is None:
            return None
        name, expires = entry
        if expires < time.monotonic():
            del self._table[key]
            return None
        return name

    def put(self, key: str | None, name: str) -> None:
        if key is None:
            return
        self._table[key] = (name, time.monotonic() + self._ttl)
        self._table.move_to_end(key)
        while len(self._table) > self._entries:
            self._table.popitem(last=False)
