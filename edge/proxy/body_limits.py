"""Context-bomb limits on a parsed request body: prompt characters and words, messages, images.

The body-bytes limit (aiohttp's `client_max_size`) stops a huge upload; these stop a body that is
small enough to upload but would still cost the workstation dearly: a prompt of a million words
to tokenise, a conversation of ten thousand messages, a batch of images each of which the model
encodes. A request over a limit is answered 413 `payload_too_large` before it reaches the gate,
with a message naming the limit, its value and the setting that changes it.

What counts as the prompt: `prompt`, `system`, `suffix`, `template` and `input` (a string or a
list of strings), every message's `content` (a string or OpenAI content parts' `text`), and
token-id arrays (`context`, or an OpenAI `prompt` of token ids) at one word per token. Words are
whitespace-separated runs, as `str.split()` counts them. Characters are counted too, so a prompt
without spaces (or written in a script that uses none) cannot pass as one long word. Images are
Ollama `images` arrays (on the body and on each message) and OpenAI `image_url` content parts.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from edge.errors import InvalidRequest, PayloadTooLarge

TEXT_FIELDS = ("prompt", "system", "suffix", "template", "input")
TOKEN_FIELDS = ("context",)
# ASCII text is counted on bytes (five times quicker than `str.split()` for the same answer):
# whitespace becomes a space, anything else an `x`, and a word is where an `x` follows a space.
_ASCII_SPACE = frozenset(b" \t\n\r\x0b\x0c\x1c\x1d\x1e\x1f")
_WORD_MAP = bytes(0x20 if i in _ASCII_SPACE else 0x78 for i in range(256))


@dataclass(frozen=True, slots=True)
class BodyLimits:
    """The limits a body is held to; built once from the settings."""

    max_prompt_chars: int
    max_prompt_words: int
    max_messages: int
    max_images: int


@dataclass(slots=True)
class PromptSize:
    """What a body asks the model to read."""

    chars: int = 0
    words: int = 0
    messages: int = 0
    images: int = 0


def check(body: dict[str, Any], limits: BodyLimits) -> PromptSize:
    """Measure `body` and refuse it if it is over a limit.

    Error handling: `PayloadTooLarge` (413) names the first limit passed; `InvalidRequest` (400)
    for an `images` field that is not a list. Characters are checked before words, so counting
    words never costs more than `max_prompt_chars` allows.
    """
    size = PromptSize()
    texts: list[str] = []
    for name in TEXT_FIELDS:
        _collect(body.get(name), texts, size)
    for name in TOKEN_FIELDS:
        _collect(body.get(name), texts, size)
    size.images += _images(body.get("images"), "'images'")
    messages = body.get("messages")
    if isinstance(messages, list):
        size.messages = len(messages)
        for message in messages:
            if isinstance(message, dict):
                _collect(message.get("content"), texts, size)
                size.images += _images(message.get("images"), "a message's 'images'")
    _refuse_over(size.messages, limits.max_messages, "the conversation has {} messages", "MESSAGES")
    _refuse_over(size.images, limits.max_images, "the request has {} images", "IMAGES")
    size.chars = sum(map(len, texts))
    _refuse_over(
        size.chars, limits.max_prompt_chars, "the prompt has {} characters", "PROMPT_CHARS"
    )
    size.words += sum(map(count_words, texts))
    _refuse_over(size.words, limits.max_prompt_words, "the prompt has {} words", "PROMPT_WORDS")
    return size


def count_words(text: str) -> int:
    """Whitespace-separated runs in `text`, exactly as `len(text.split())` counts them."""
    if not text.isascii():
        return len(text.split())
    mapped = text.encode("ascii").translate(_WORD_MAP)
    return mapped.count(b" x") + (mapped[:1] == b"x")


def _collect(value: Any, texts: list[str], size: PromptSize, nested: bool = False) -> None:
    """Add `value`'s text to `texts`, its images and token ids to `size`."""
    if isinstance(value, str):
        texts.append(value)
    elif isinstance(value, int) and not isinstance(value, bool):
        size.words += 1  # a token id
    elif isinstance(value, list):
        for part in value:
            if isinstance(part, dict):  # an OpenAI content part
                if part.get("type") == "image_url":
                    size.images += 1
                elif isinstance(part.get("text"), str):
                    texts.append(part["text"])
            elif not (nested and isinstance(part, list)):  # one level: a batch of prompts
                _collect(part, texts, size, nested=True)


def _images(value: Any, what: str) -> int:
    if value is None:
        return 0
    if not isinstance(value, list):
        raise InvalidRequest(f"{what} must be a list")
    return len(value)


def _refuse_over(value: int, limit: int, measured: str, setting: str) -> None:
    if value > limit:
        raise PayloadTooLarge(
            f"{measured.format(value)}; the limit is {limit} (BACKHAUL_EDGE_MAX_{setting})"
        )
