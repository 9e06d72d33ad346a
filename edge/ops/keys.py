"""`backhaul-edge keys add|list|revoke`: manage the API keys file the edge serves from.

`add` prints the new secret once, on stdout, and stores only its SHA-256; `list` never shows a
secret; `revoke` disables a key (kept in the file, so `list` shows it was revoked). Each command
rewrites the file atomically under a lock file, and a running edge picks the change up within a
second (or at once on SIGHUP) without a restart.
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import functools
import sys
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import orjson

from edge.ops.timeparse import time_arg
from edge.policy.keys import ApiKey, KeysFile, digest, new_secret, read_keys_file, write_keys_file
from edge.settings import EdgeSettings
from shared.errors import ConfigError

# Hours, days and weeks: `m` is left out, since in an expiry it reads as months as well as minutes.
_EXPIRY_UNITS = "hdw"


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    parser = subparsers.add_parser("keys", help="manage API keys", description=__doc__)
    parser.add_argument("--config", type=Path, help="TOML file (default /etc/backhaul/edge.toml)")
    parser.add_argument("--keys-path", type=Path, help="the keys file (default from settings)")
    sub = parser.add_subparsers(dest="keys_command", required=True, metavar="ACTION")

    add = sub.add_parser("add", help="create a key and print its secret once")
    add.add_argument("name", help="a name for the key: letters, digits, . _ -")
    add.add_argument(
        "--models",
        nargs="+",
        default=[],
        metavar="MODEL",
        help="models this key may use (default: every model the edge allows)",
    )
    add.add_argument("--rpm", type=_positive, help="requests per minute")
    add.add_argument("--tpm", type=_positive, help="tokens (prompt + generated) per minute")
    add.add_argument("--max-concurrency", type=_positive, help="requests in flight at once")
    add.add_argument(
        "--expires",
        type=time_arg(ago=False, units=_EXPIRY_UNITS),
        help="30d, 12h, 2w, a date or an ISO time",
    )
    add.set_defaults(func=run_add)

    listing = sub.add_parser("list", help="show the keys (never their secrets)")
    listing.add_argument("--json", action="store_true", help="print JSON")
    listing.set_defaults(func=run_list)

    revoke = sub.add_parser("revoke", help="disable a key at once")
    revoke.add_argument("name")
    revoke.set_defaults(func=run_revoke)


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError("must be at least 1")
    return value


def _keys_path(args: argparse.Namespace) -> Path:
    if args.keys_path is not None:
        return Path(args.keys_path)
    return EdgeSettings.load(args.config).keys_path


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[KeysFile]:
    """The current file (empty if missing), with the lock held until the block ends."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.with_name(path.name + ".lock"), "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        yield _read(path)


def _read(path: Path) -> KeysFile:
    """The keys file at `path`; none yet is no keys."""
    return read_keys_file(path) if path.exists() else KeysFile()


def _guarded(action: Callable[[argparse.Namespace], int]) -> Callable[[argparse.Namespace], int]:
    """`action`, with a bad keys file, a bad value or a file it cannot write reported on
    stderr as exit status 2, not a traceback."""

    @functools.wraps(action)
    def run(args: argparse.Namespace) -> int:
        try:
            return action(args)
        except (ConfigError, ValueError, OSError) as exc:
            print(f"backhaul-edge keys: {exc}", file=sys.stderr)
            return 2

    return run


@_guarded
def run_add(args: argparse.Namespace) -> int:
    path = _keys_path(args)
    secret = new_secret()
    key = ApiKey(
        name=args.name,
        hash=digest(secret),
        created=datetime.now(UTC).replace(microsecond=0),
        expires=args.expires,
        models=frozenset(args.models),
        rpm=args.rpm,
        tpm=args.tpm,
        max_concurrency=args.max_concurrency,
    )
    with _locked(path) as keys:
        if any(k.name == key.name for k in keys.keys):
            print(f"backhaul-edge keys: a key named {key.name!r} exists", file=sys.stderr)
            return 1
        write_keys_file(path, KeysFile(keys=[*keys.keys, key]))
    print(secret)
    print(
        f"key {key.name!r} added to {path}; the secret above is shown only once: "
        "send it as 'Authorization: Bearer <secret>'",
        file=sys.stderr,
    )
    return 0


@_guarded
def run_list(args: argparse.Namespace) -> int:
    path = _keys_path(args)
    keys = _read(path)
    now = datetime.now(UTC).timestamp()
    if args.json:
        rows = [_row(k, now) for k in keys.keys]
        sys.stdout.buffer.write(orjson.dumps(rows, option=orjson.OPT_INDENT_2) + b"\n")
        return 0
    if not keys.keys:
        print(f"no keys in {path}; add one with: backhaul-edge keys add NAME")
        return 0
    print(f"{'name':<20} {'state':<8} {'expires':<20} {'rpm':>6} {'tpm':>8} {'conc':>4}  models")
    for key in keys.keys:
        row = _row(key, now)
        print(
            f"{key.name:<20} {row['state']:<8} {row['expires'] or '-':<20} "
            f"{key.rpm or '-':>6} {key.tpm or '-':>8} {key.max_concurrency or '-':>4}  "
            f"{', '.join(sorted(key.models)) or '(all allowed)'}"
        )
    return 0


def _row(key: ApiKey, now: float) -> dict[str, Any]:
    state = "revoked" if not key.enabled else "expired" if key.expired(now) else "active"
    row = key.model_dump(mode="json", exclude={"hash"})
    row["state"] = state
    return row


@_guarded
def run_revoke(args: argparse.Namespace) -> int:
    path = _keys_path(args)
    with _locked(path) as keys:
        names = [k.name for k in keys.keys]
        if args.name not in names:
            print(f"backhaul-edge keys: no key named {args.name!r} in {path}", file=sys.stderr)
            return 1
        updated = [
            k.model_copy(update={"enabled": False}) if k.name == args.name else k for k in keys.keys
        ]
        write_keys_file(path, KeysFile(keys=updated))
    print(f"key {args.name!r} revoked; the edge refuses it within a second", file=sys.stderr)
    return 0
