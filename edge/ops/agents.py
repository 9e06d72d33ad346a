"""`backhaul-edge agents`: the running edge's pool, as a table or the JSON it served.

The pool lives in the running edge, not in any file, so this command asks the edge's `/agents`
(the same access rule as `/metrics`: a direct loopback peer, or the metrics token as a bearer,
which is sent whenever the settings have one). Stdlib `urllib`: one request, no event loop.
Exit status: 0 when the pool was printed, 1 when the edge could not be reached or refused (the
message says which), 2 on a usage or settings error.
"""

from __future__ import annotations

import argparse
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import orjson

from edge.settings import EdgeSettings
from shared.cli import Subparsers, add_command
from shared.errors import ConfigError

DESCRIPTION = """\
Show the agents the running edge serves from: state, models, loaded models, requests in flight
against capacity, decoding speed, and since when the state holds (cooling down, when one is).

The edge is asked at http://HOST:PORT/agents from its settings (a wildcard listen address is
asked on 127.0.0.1), or at --url. The metrics token is sent when one is configured: without it,
only a direct loopback caller is answered."""

# Seconds: the edge answers /agents from memory; longer than this and it is not answering.
_TIMEOUT_S = 5.0
# A list of names up to this many characters is printed; a longer one as its count.
_NAMES_MAX_CHARS = 32
_WILDCARDS = ("0.0.0.0", "::", "")


def register(subparsers: Subparsers) -> None:
    parser = add_command(subparsers, "agents", "show the live agent pool", DESCRIPTION)
    parser.add_argument("--config", type=Path, help="TOML file (default /etc/backhaul/edge.toml)")
    parser.add_argument("--url", help="the edge's base URL (default from its host and port)")
    parser.add_argument("--json", action="store_true", help="print the JSON as the edge sent it")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    try:
        settings = EdgeSettings.load(args.config)
    except ConfigError as exc:
        print(f"backhaul-edge agents: {exc}", file=sys.stderr)
        return 2
    url = (args.url or base_url(settings)).rstrip("/") + "/agents"
    if not url.startswith(("http://", "https://")):
        message = f"--url {args.url!r} is not http:// or https://"
        print(f"backhaul-edge agents: {message}", file=sys.stderr)
        return 2
    token = settings.metrics_token.get_secret_value() if settings.metrics_token else None
    try:
        body = fetch(url, token)
        agents: list[dict[str, Any]] = orjson.loads(body)["agents"]
    except Unanswered as exc:
        print(f"backhaul-edge agents: {exc}", file=sys.stderr)
        return 1
    except (orjson.JSONDecodeError, KeyError, TypeError):
        print(f"backhaul-edge agents: {url} did not answer the edge's JSON", file=sys.stderr)
        return 1
    if args.json:
        sys.stdout.write(body.decode() + "\n")
    else:
        print(table(agents, time.time()))
    return 0


def base_url(settings: EdgeSettings) -> str:
    """Where the edge's own routes are reached from this machine."""
    host = "127.0.0.1" if settings.host in _WILDCARDS else settings.host
    if ":" in host:
        host = f"[{host}]"
    return f"http://{host}:{settings.port}"


class Unanswered(Exception):
    """The edge could not be reached, or answered other than 200; the message says which."""


def fetch(url: str, token: str | None) -> bytes:
    """The body of `GET url`, with `token` as a bearer when given.

    Error handling: no connection, a timeout or a status other than 200 raise `Unanswered`,
    naming the URL and the status or reason."""
    # S310: `url` is http(s), checked by `run()`.
    request = urllib.request.Request(url, headers={"Accept": "application/json"})  # noqa: S310
    if token is not None:
        request.add_header("Authorization", f"Bearer {token}")
    try:
        with urllib.request.urlopen(request, timeout=_TIMEOUT_S) as response:  # noqa: S310
            body: bytes = response.read()
            if response.status != 200:
                raise Unanswered(f"{url} answered {response.status}")
            return body
    except urllib.error.HTTPError as exc:
        raise Unanswered(f"{url} answered {exc.code}: {_said(exc.read())}") from exc
    except urllib.error.URLError as exc:
        raise Unanswered(f"cannot reach the edge at {url}: {exc.reason}") from exc
    except (OSError, ValueError) as exc:  # a timeout while reading; a URL urllib cannot use
        raise Unanswered(f"cannot reach the edge at {url}: {exc}") from exc


def _said(body: bytes) -> str:
    """The message of the edge's JSON error (either of its shapes), else the body's start."""
    try:
        error = orjson.loads(body).get("error")
    except (orjson.JSONDecodeError, AttributeError):
        return body[:200].decode(errors="replace").strip() or "(no body)"
    if isinstance(error, dict):
        error = error.get("message")
    return str(error)


def table(agents: list[dict[str, Any]], now: float) -> str:
    """The pool as aligned columns; COOLING only when some agent is cooling down."""
    if not agents:
        return "no agents (none configured, none connected)"
    cooling = any(agent.get("cooling_s") for agent in agents)
    header = ["NAME", "STATE", "MODELS", "LOADED", "IN-FLIGHT", "TOK/S", "SINCE"]
    rows = [[*header, "COOLING"] if cooling else header]
    for agent in agents:
        row = [
            agent["name"],
            agent["state"],
            _names(agent["models"]),
            _names(agent["loaded"]),
            f"{agent['in_flight']}/{agent['capacity']}",
            "-" if agent["tok_per_s"] is None else f"{agent['tok_per_s']:.1f}",
            ago(now - agent["since"]),
        ]
        if cooling:
            row.append(f"{agent['cooling_s']:.0f}s" if agent["cooling_s"] else "-")
        rows.append(row)
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return "\n".join(
        "  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip()
        for row in rows
    )


def _names(names: list[str]) -> str:
    text = ",".join(names)
    if not names:
        return "-"
    return text if len(text) <= _NAMES_MAX_CHARS else f"{len(names)} models"


def ago(seconds: float) -> str:
    """`seconds` in the past as `12s ago`, `3m12s ago`, `2h05m ago` or `3d04h ago`."""
    s = max(0, int(seconds))
    if s < 60:
        return f"{s}s ago"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s ago"
    if s < 86400:
        return f"{s // 3600}h{s % 3600 // 60:02d}m ago"
    return f"{s // 86400}d{s % 86400 // 3600:02d}h ago"
