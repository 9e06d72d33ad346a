"""Logging, configured once per process in `main()`.

Events have dotted names and fields (`log.info("tunnel.up", remote_port=p)`). In production the
output is one JSON object per line, rendered by orjson straight to bytes; on a terminal it is
structlog's console renderer. Library loggers (asyncssh, aiohttp) go through the same pipeline.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import MutableMapping
from contextvars import ContextVar
from typing import Any, Literal

import orjson
import structlog

LogFormat = Literal["auto", "json", "console"]

# The request a task is serving, added to each of its log events as `request_id`. Its own
# variable rather than structlog's `bound_contextvars`, which copies every context variable on
# each entry and exit: set and reset once a request, it costs nothing until something logs.
REQUEST_ID: ContextVar[str | None] = ContextVar("request_id", default=None)


def add_request_id(
    _logger: Any, _method: str, event: MutableMapping[str, Any]
) -> MutableMapping[str, Any]:
    request_id = REQUEST_ID.get()
    if request_id is not None:
        event.setdefault("request_id", request_id)
    return event


# What every event gets from the context it was logged in (tests capture events with these).
CONTEXT_PROCESSORS: tuple[structlog.typing.Processor, ...] = (
    structlog.contextvars.merge_contextvars,
    add_request_id,
)


def configure_logging(level: str = "info", fmt: LogFormat = "auto") -> None:
    """Configure structlog and the stdlib root logger; safe to call more than once."""
    numeric = logging.getLevelNamesMapping().get(level.upper(), logging.INFO)
    use_json = fmt == "json" or (fmt == "auto" and not sys.stderr.isatty())
    shared: list[structlog.typing.Processor] = [
        *CONTEXT_PROCESSORS,
        structlog.processors.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
    ]
    renderer: structlog.typing.Processor
    if use_json:
        renderer = structlog.processors.JSONRenderer(serializer=_dumps)
        shared.append(structlog.processors.format_exc_info)
        factory: structlog.typing.WrappedLogger = structlog.BytesLoggerFactory(sys.stderr.buffer)
    else:
        renderer = structlog.dev.ConsoleRenderer(colors=sys.stderr.isatty())
        factory = structlog.PrintLoggerFactory(sys.stderr)
    structlog.configure(
        processors=[*shared, renderer],
        wrapper_class=structlog.make_filtering_bound_logger(numeric),
        logger_factory=factory,
        cache_logger_on_first_use=True,
    )
    # Route stdlib logging (asyncssh, aiohttp) through a plain handler at a quieter level:
    # asyncssh logs every channel at INFO, which would drown our own events.
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(max(numeric, logging.WARNING))


def _dumps(obj: object, **_: object) -> bytes:
    return orjson.dumps(obj, default=str)
