"""The telemetry record: one JSON line per request (DESIGN.md §5).

The schema is versioned by `v`; fields are stable snake_case names that operators script against
with `jq` and `backhaul-edge stats`. Prompts and answers are never part of it. The writer lives
with the edge (`edge.telemetry`); the readers (stats, tail) parse lines back with `parse_line`.
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import orjson

SCHEMA_VERSION = 1


@dataclass(slots=True, kw_only=True)
class RequestRecord:
    """Everything the edge knows about one request once it has ended, however it ended.

    Field order is the line's order: version and time first, as operators read them.
    """

    v: int = SCHEMA_VERSION
    ts: str = ""
    id: str
    method: str
    route: str
    feature: str | None = None
    model: str | None = None
    key: str | None = None  # the key's name, never the secret
    client: str | None = None
    status: int = 0
    type: str | None = None  # the error type, or None on success
    outcome: str = "ok"  # ok, error, client_gone, upstream_broken
    stream: bool = False
    upstream: str | None = None
    agent: str | None = None  # the workstation that answered (or failed last), by its name
    upstream_retries: int = 0  # resends on a new connection after a reused one was dead
    failovers: int = 0  # other agents tried after one failed before any byte reached the client
    # Where the answer was made: an agent's name, or `cloud:<name>` for a cloud fallback
    # (docs/fallback.md); None when nothing served it.
    served_by: str | None = None
    # What the answer cost in US dollars (a cloud's, from its price table), or for an answer
    # made locally, what the same tokens would have cost on `cost_reference`: money saved.
    cost_usd: float | None = None
    # Who decided the rate limits: "local" (this edge's buckets) or "redis" (the edges'
    # shared ones); None when no limit applied.
    limiter: str | None = None
    queue_ms: float | None = None
    ttfb_ms: float | None = None  # sending upstream to its response headers
    # Sending upstream to the first generated token of a stream; for a buffered answer, the
    # model server's own prompt time (llama.cpp `timings.prompt_ms`, Ollama
    # `prompt_eval_duration`), or None when it reports none.
    ttft_ms: float | None = None
    elapsed_ms: float = 0.0
    overhead_ms: float | None = None
    prompt_chars: int | None = None
    prompt_tokens: int | None = None
    tokens: int | None = None
    gen_ms: float | None = None
    tok_per_s: float | None = None
    # Where tok_per_s (and gen_ms) came from: "server", the model server's own decode figures
    # (Ollama's eval_duration, llama.cpp's timings); "measured", the edge's clock (a stream
    # from its first generated token to its end; a buffered answer, the whole upstream time).
    speed_source: str | None = None
    bytes_in: int = 0
    bytes_out: int = 0

    def to_json_line(self) -> bytes:
        """The record as one JSON line, newline included, timestamped now if `ts` is empty."""
        if not self.ts:
            self.ts = utc_now_iso()
        return orjson.dumps(self, option=orjson.OPT_APPEND_NEWLINE)


FIELDS: tuple[str, ...] = tuple(f.name for f in dataclasses.fields(RequestRecord))


_second: int = -1
_second_prefix = ""


def utc_now_iso() -> str:
    """ISO 8601 UTC with milliseconds and a `Z`, the `ts` format.

    Called once per request: the date and time up to the second are formatted once a second.
    """
    global _second, _second_prefix
    now = time.time()
    second = int(now)
    if second != _second:
        stamp = datetime.fromtimestamp(second, UTC).isoformat(timespec="seconds")
        _second, _second_prefix = second, stamp.removesuffix("+00:00")
    return f"{_second_prefix}.{int((now - second) * 1000):03d}Z"


def parse_line(line: bytes | str) -> dict[str, Any]:
    """Parse one JSONL line back to a dict; raises `ValueError` on a corrupt line."""
    obj = orjson.loads(line)
    if not isinstance(obj, dict) or "v" not in obj:
        raise ValueError("not a backhaul telemetry record")
    return obj
