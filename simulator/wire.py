"""Request fields in, bytes out: the Ollama simulator's wire format as pure functions.

`simulator.app` owns timing, queueing and sockets; this module owns the JSON they carry:
native NDJSON chunks and final objects, the OpenAI-compatible objects Ollama's `/v1` shim makes
of them, embeddings and error bodies; reading request fields the way Ollama's Go types read
them; and Ollama's Host and Origin guards (what each model is: `simulator.models`). Each
shape follows Ollama's source (`api/types.go`, `openai/openai.go`, `middleware/openai.go`,
`server/routes.go`; research/gateway-anchors.md §1), so it can be checked in one place. Nothing
here sleeps or touches a socket; the only clock read is the wall-clock `created_at` stamp.
"""

from __future__ import annotations

import base64
import hashlib
import ipaddress
import math
import re
import socket
import struct
import time
from collections.abc import Collection
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Protocol
from urllib.parse import urlsplit

import orjson

from simulator import models as catalogue

VERSION = "0.12.6"
NDJSON = "application/x-ndjson"
SSE = "text/event-stream"
SSE_DONE = b"data: [DONE]\n\n"

# The reply vocabulary: fixed, so every reply is predictable and each token is one word.
WORDS = (
    "The", "quick", "brown", "fox", "jumps", "over", "the", "lazy", "dog", "while", "a",
    "tunnel", "carries", "every", "token", "home", "through", "the", "night",
)  # fmt: skip


def reply(n: int) -> list[str]:
    """The first `n` tokens of the reply; joined they read as words separated by spaces."""
    return [("" if i == 0 else " ") + WORDS[i % len(WORDS)] for i in range(n)]


def timestamp(unix_s: float) -> str:
    """RFC 3339 UTC with fractional seconds, as Go marshals `time.Time` (`created_at`)."""
    return datetime.fromtimestamp(unix_s, UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def ndjson(obj: dict[str, Any]) -> bytes:
    return orjson.dumps(obj) + b"\n"


def sse(obj: dict[str, Any]) -> bytes:
    return b"data: " + orjson.dumps(obj) + b"\n\n"


@dataclass(frozen=True, slots=True)
class Metrics:
    """Ollama's `Metrics` struct (nanoseconds and token counts) for one request."""

    total_ns: int
    load_ns: int
    prompt_tokens: int
    prompt_ns: int
    eval_tokens: int
    eval_ns: int

    def fields(self) -> dict[str, int]:
        # Every metric is `omitempty` in Go: a zero is absent on the wire, not 0.
        named = {
            "total_duration": self.total_ns,
            "load_duration": self.load_ns,
            "prompt_eval_count": self.prompt_tokens,
            "prompt_eval_duration": self.prompt_ns,
            "eval_count": self.eval_tokens,
            "eval_duration": self.eval_ns,
        }
        return {k: v for k, v in named.items() if v}


def native_chunk(chat: bool, model: str, created: str, text: str) -> dict[str, Any]:
    """One streamed token of `/api/chat` (`chat`) or `/api/generate`."""
    if chat:
        return {
            "model": model,
            "created_at": created,
            "message": {"role": "assistant", "content": text},
            "done": False,
        }
    return {"model": model, "created_at": created, "response": text, "done": False}


def native_final(
    chat: bool, model: str, created: str, text: str, reason: str, metrics: Metrics | None
) -> dict[str, Any]:
    """The `done: true` object: the last line of a stream, or the whole non-streamed reply."""
    obj = native_chunk(chat, model, created, text)
    obj["done"] = True
    obj["done_reason"] = reason
    if metrics is not None:
        if not chat:
            # `context` (deprecated) is the conversation's token ids; any stable ids will do.
            ids = [_token_id(i) for i in range(metrics.prompt_tokens + metrics.eval_tokens)]
            obj["context"] = ids
        obj.update(metrics.fields())
    return obj


def _token_id(i: int) -> int:
    # Llama 3's vocabulary has 128,256 entries; 7919 (prime) spreads the ids over it.
    return (i * 7919 + 128) % 128_256


def openai_usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }


def openai_chunk(
    chat: bool, ident: str, created: int, model: str, text: str, finish: str | None
) -> dict[str, Any]:
    """A `chat.completion.chunk`, or for `/v1/completions` a streamed `text_completion`."""
    kind = "chat.completion.chunk" if chat else "text_completion"
    return _openai_object(kind, ident, created, model, _choice(chat, "delta", text, finish))


def openai_whole(
    chat: bool, ident: str, created: int, model: str, text: str, finish: str, usage: dict[str, int]
) -> dict[str, Any]:
    """A non-streamed `chat.completion` or `text_completion`, with `usage`."""
    kind = "chat.completion" if chat else "text_completion"
    choice = _choice(chat, "message", text, finish)
    return {**_openai_object(kind, ident, created, model, choice), "usage": usage}


def _choice(chat: bool, field: str, text: str, finish: str | None) -> dict[str, Any]:
    # A chat choice carries the text as a `delta` (streamed) or a `message`; a completion's is flat.
    if chat:
        return {"index": 0, field: {"role": "assistant", "content": text}, "finish_reason": finish}
    return {"text": text, "index": 0, "finish_reason": finish}


def _openai_object(
    kind: str, ident: str, created: int, model: str, choice: dict[str, Any]
) -> dict[str, Any]:
    return {
        "id": ident,
        "object": kind,
        "created": created,
        "model": model,
        "system_fingerprint": "fp_ollama",
        "choices": [choice],
    }


def embedding(model: str, text: str, dims: int, normalize: bool) -> list[float]:
    """A deterministic vector for `text`: the same input always gives the same floats."""
    raw = hashlib.shake_256(f"{model}\0{text}".encode()).digest(2 * dims)
    vec = [v / 32768.0 - 1.0 for v in struct.unpack(f"<{dims}H", raw)]
    if not normalize:
        return vec
    # `/api/embed` returns unit vectors; the legacy `/api/embeddings` does not.
    norm = math.sqrt(sum(v * v for v in vec)) or 1.0
    return [v / norm for v in vec]


def embedding_base64(vec: list[float]) -> str:
    """OpenAI's `encoding_format: "base64"`: little-endian float32s (the openai SDK default)."""
    return base64.b64encode(struct.pack(f"<{len(vec)}f", *vec)).decode()


def embed_body(
    model: str, vectors: list[list[float]], tokens: int, total_ns: int, load_ns: int
) -> dict[str, Any]:
    """`POST /api/embed` (no eval figures: nothing is generated; zeros omitted, as in Go)."""
    figures = {"total_duration": total_ns, "load_duration": load_ns, "prompt_eval_count": tokens}
    return {"model": model, "embeddings": vectors, **{k: v for k, v in figures.items() if v}}


def openai_embeddings(
    model: str, vectors: list[list[float]], fmt: str, tokens: int
) -> dict[str, Any]:
    """`POST /v1/embeddings`: floats, or base64 when asked (the openai SDK always asks)."""
    data = [
        {
            "object": "embedding",
            "embedding": embedding_base64(v) if fmt == "base64" else v,
            "index": i,
        }
        for i, v in enumerate(vectors)
    ]
    usage = {"prompt_tokens": tokens, "total_tokens": tokens}
    return {"object": "list", "data": data, "model": model, "usage": usage}


def ps_body(loaded: dict[str, float], now: float) -> dict[str, Any]:
    """`GET /api/ps`: the models whose keep-alive has not run out (unix expiry per name)."""
    # Go's "forever" is the largest time.Duration; any far-future date reads the same.
    live = [(name, min(expiry, 1e10)) for name, expiry in loaded.items() if expiry > now]
    return {"models": [catalogue.ps_entry(name, timestamp(expiry)) for name, expiry in live]}


@dataclass(frozen=True, slots=True)
class Job:
    """One generation request, normalised from whichever route it came in on."""

    model: str  # as the client spelled it: Ollama echoes it back
    chat: bool
    stream: bool
    prompt_tokens: int
    limit: int  # num_predict / max_tokens; <= 0 means no limit, as in Ollama's runner
    format: Any = None  # JSON mode: "json" or a schema (`simulator.formats`); None: free text


class Reply(Protocol):
    """How one route family renders a generation: streamed pieces, or one whole object."""

    @property
    def content_type(self) -> str: ...

    def chunk(self, token: str) -> bytes: ...
    def tail(self, reason: str, metrics: Metrics) -> bytes: ...
    def done(self, text: str, reason: str, metrics: Metrics | None) -> dict[str, Any]: ...


@dataclass(frozen=True, slots=True)
class NativeReply:
    """`/api/generate` and `/api/chat`: NDJSON lines, the last one `done: true`."""

    job: Job
    content_type: str = NDJSON

    def chunk(self, token: str) -> bytes:
        return ndjson(native_chunk(self.job.chat, self.job.model, _now(), token))

    def tail(self, reason: str, metrics: Metrics) -> bytes:
        return ndjson(self.done("", reason, metrics))

    def done(self, text: str, reason: str, metrics: Metrics | None) -> dict[str, Any]:
        return native_final(self.job.chat, self.job.model, _now(), text, reason, metrics)


@dataclass(frozen=True, slots=True)
class OpenAIReply:
    """`/v1/chat/completions` and `/v1/completions`, as Ollama's shim writes them."""

    job: Job
    ident: str  # chatcmpl-N / cmpl-N
    created: int  # pinned to the request, as the shim does
    include_usage: bool
    content_type: str = SSE

    def _chunk(self, text: str, finish: str | None) -> dict[str, Any]:
        job = self.job
        obj = openai_chunk(job.chat, self.ident, self.created, job.model, text, finish)
        if self.include_usage and not job.chat:
            obj["usage"] = openai_usage(0, 0)  # the shim's /v1/completions chunks carry zeros
        return obj

    def chunk(self, token: str) -> bytes:
        return sse(self._chunk(token, None))

    def tail(self, reason: str, metrics: Metrics) -> bytes:
        # A finish chunk; then, only if asked, a usage chunk with no choices; then [DONE].
        finish = self._chunk("", reason)
        out = sse(finish)
        if self.include_usage:
            usage = openai_usage(self.job.prompt_tokens, metrics.eval_tokens)
            out += sse({**finish, "choices": [], "usage": usage})
        return out + SSE_DONE

    def done(self, text: str, reason: str, metrics: Metrics | None) -> dict[str, Any]:
        job = self.job
        used = (metrics.prompt_tokens, metrics.eval_tokens) if metrics else (0, 0)
        usage = openai_usage(*used)
        return openai_whole(job.chat, self.ident, self.created, job.model, text, reason, usage)


def _now() -> str:
    return timestamp(time.time())


class WireError(Exception):
    """A failure before the first byte of a reply: rendered as a status in the route's shape."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


def error_body(path: str, status: int, message: str) -> dict[str, Any]:
    """Ollama's `{"error": msg}`, or on `/v1` the shim's `openai.NewError` shape."""
    if not path.startswith("/v1/"):
        return {"error": message}
    # The type follows the status (Ollama HEAD; releases before it always said api_error).
    kind = {400: "invalid_request_error", 404: "not_found_error"}.get(status, "api_error")
    return {"error": {"message": message, "type": kind, "param": None, "code": None}}


def request_object(body: Any) -> dict[str, Any]:
    if body is None:
        raise WireError(400, "missing request body")
    if not isinstance(body, dict):
        raise WireError(400, f"json: cannot unmarshal {type(body).__name__} into a request")
    return body


def require_model(body: dict[str, Any], served: Collection[str]) -> str:
    """The model as the client spelled it; 400 if absent, 404 if not in `served` (model keys)."""
    name = body.get("model")
    if not isinstance(name, str) or not name:
        raise WireError(400, "model is required")
    if catalogue.model_key(name) not in served:
        raise WireError(404, f'model "{name}" not found, try pulling it first')
    return name


def int_field(value: Any, what: str) -> int:
    if value is None:
        return 0
    if isinstance(value, bool) or not isinstance(value, int):
        raise WireError(400, f"{what} must be an integer")
    return value


def words(value: Any) -> int:
    """Whitespace words in a prompt, a message list or content parts: the token estimate."""
    if isinstance(value, str):
        return len(value.split())
    if isinstance(value, list):
        return sum(words(v) for v in value)
    if isinstance(value, dict):
        return words(value.get("content")) + words(value.get("text"))
    return 0


_DURATION = re.compile(r"(-?\d+(?:\.\d+)?)(ms|s|m|h)?")
_UNIT_S = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, None: 1.0}


def keep_alive_s(value: Any, default: float) -> float:
    """`keep_alive` in seconds: a number (seconds) or a Go duration; negative means forever."""
    if value is None:
        return default
    if isinstance(value, int | float) and not isinstance(value, bool):
        seconds = float(value)
    elif isinstance(value, str) and (match := _DURATION.fullmatch(value.strip())):
        seconds = float(match[1]) * _UNIT_S[match[2]]
    else:
        raise WireError(400, f'time: invalid duration "{value}"')
    return math.inf if seconds < 0 else seconds


def embed_inputs(value: Any, openai: bool) -> list[str]:
    """The texts to embed: `input` (string or list) as `/api/embed` or `/v1/embeddings` read it."""
    if isinstance(value, str):
        return [value] if value or openai else []
    if isinstance(value, list) and all(isinstance(v, str) for v in value):
        if openai and not value:
            raise WireError(400, "invalid input")
        return list(value)
    if value is None and not openai:
        return []
    raise WireError(400, "invalid input" if openai else "invalid input type")


_LOCAL_SUFFIXES = (".localhost", ".local", ".internal")
_ORIGINS = re.compile(
    r"https?://(localhost|127\.0\.0\.1|0\.0\.0\.0)(:\d+)?"
    r"|(app|file|tauri|vscode-webview|vscode-file|chrome-extension|moz-extension"
    r"|safari-extension|ms-browser-extension)://.*"
)


def host_allowed(host: str) -> bool:
    """Ollama's DNS-rebinding guard on a loopback listener (`allowedHostsMiddleware`)."""
    name = urlsplit(f"//{host}").hostname or ""
    try:
        ip = ipaddress.ip_address(name)
    except ValueError:
        local = ("", "localhost", socket.gethostname().lower())
        return name in local or name.endswith(_LOCAL_SUFFIXES)
    return ip.is_loopback or ip.is_private or ip.is_unspecified


def origin_allowed(origin: str | None, host: str) -> bool:
    """Ollama's CORS check with the default OLLAMA_ORIGINS; the rest get a bare 403."""
    if not origin or origin in (f"http://{host}", f"https://{host}"):
        return True  # gin-contrib/cors lets same-origin requests through unchecked
    return _ORIGINS.fullmatch(origin) is not None
