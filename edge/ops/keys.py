"""`backhaul-edge keys add|list|revoke`: manage the API keys file the edge serves from.

`add` prints the new secret once, on stdout, and stores only its SHA-256; `list` never shows a
secret, and shows each token budget with what the key spent of it this period (from the budgets
file the edge saves every few seconds); `revoke` disables a key (kept in the file, so `list`
shows it was revoked). `add --fallback CLOUD` lets a key's requests go to a cloud the edge's
settings configure (`[clouds.CLOUD]`), `add --local-only` keeps them on the workstations whatever
else names a cloud (docs/fallback.md). Each command rewrites the file atomically under a lock
file, and a running edge picks the change up within a second (or at once on SIGHUP) without a
restart. There is no verb that edits a key: a budget is set by `add --budget`, or changed by
editing the keys file.
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import functools
import re
import sys
import time
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import orjson

from edge.ops import shared_keys
from edge.ops.timeparse import time_arg
from edge.policy.budgets import Period, Spend, read_spend
from edge.policy.keys import (
    ApiKey,
    Budget,
    KeysFile,
    digest,
    new_secret,
    read_keys_file,
    write_keys_file,
)
from edge.settings import EdgeSettings
from shared.errors import ConfigError

# Hours, days and weeks: `m` is left out, since in an expiry it reads as months as well as minutes.
_EXPIRY_UNITS = "hdw"
# A budget as typed: `1000000/month`, `1M/month`, `500k/day`, `1.5M/month`.
_BUDGET = re.compile(r"(\d+(?:\.\d+)?)([kKmM]?)/(day|month)")
_MULTIPLIERS = {"": 1, "k": 1_000, "m": 1_000_000}


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    parser = subparsers.add_parser("keys", help="manage API keys", description=__doc__)
    parser.add_argument("--config", type=Path, help="TOML file (default /etc/backhaul/edge.toml)")
    parser.add_argument("--keys-path", type=Path, help="the keys file (default from settings)")
    parser.add_argument(
        "--budgets-path", type=Path, help="the edge's budgets file (default from settings)"
    )
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
        "--budget",
        type=_budget,
        metavar="TOKENS/PERIOD",
        help="tokens per UTC day or month: 1000000/month, 1M/month, 500k/day",
    )
    add.add_argument(
        "--expires",
        type=time_arg(ago=False, units=_EXPIRY_UNITS),
        help="30d, 12h, 2w, a date or an ISO time",
    )
    where = add.add_mutually_exclusive_group()
    where.add_argument(
        "--fallback",
        metavar="CLOUD",
        help="a cloud ([clouds.CLOUD] in the edge's settings) this key's requests may fall back to",
    )
    where.add_argument(
        "--local-only",
        action="store_true",
        help="never send this key's prompts to a cloud, whatever a model or feature names",
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


def _budget(text: str) -> Budget:
    match = _BUDGET.fullmatch(text.strip())
    tokens = 0.0
    if match is not None:
        tokens = float(match[1]) * _MULTIPLIERS[match[2].lower()]
    if match is None or tokens < 1 or not tokens.is_integer():
        raise argparse.ArgumentTypeError(
            f"{text!r} is not a budget: write TOKENS/day or TOKENS/month, "
            "e.g. 1000000/month, 1M/month, 500k/day"
        )
    return Budget(tokens=int(tokens), period="day" if match[3] == "day" else "month")


def _settings(args: argparse.Namespace) -> EdgeSettings:
    """The edge's settings (for `redis_url`: keys several edges share)."""
    return EdgeSettings.load(args.config)


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


def _check_cloud(settings: EdgeSettings, cloud: str | None) -> None:
    """Refuse a `--fallback` that names no configured cloud: the edge would never use it, and
    the operator would believe the key has a fallback it does not."""
    if cloud is None or cloud in settings.clouds:
        return
    configured = ", ".join(sorted(settings.clouds)) or "none"
    raise ConfigError(
        f"--fallback {cloud!r}: the edge's settings have no [clouds.{cloud}] table "
        f"(clouds configured: {configured}); see docs/fallback.md"
    )


@_guarded
def run_add(args: argparse.Namespace) -> int:
    path = _keys_path(args)
    # Before the file is written: settings that do not load, or a cloud they do not configure,
    # must not leave a key in the file whose secret was never shown.
    settings = _settings(args)
    _check_cloud(settings, args.fallback)
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
        budget=args.budget,
        fallback=args.fallback,
        local_only=args.local_only,
    )
    with _locked(path) as keys:
        if any(k.name == key.name for k in keys.keys):
            print(f"backhaul-edge keys: a key named {key.name!r} exists", file=sys.stderr)
            return 1
        write_keys_file(path, KeysFile(keys=[*keys.keys, key]))
    if settings.redis_url is not None:
        shared_keys.share(settings, [key])
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
    now = time.time()
    spend = _spend(args) if any(k.budget for k in keys.keys) else {}
    rows = [_row(k, now, spend) for k in keys.keys]
    if args.json:
        sys.stdout.buffer.write(orjson.dumps(rows, option=orjson.OPT_INDENT_2) + b"\n")
        return 0
    if not keys.keys:
        print(f"no keys in {path}; add one with: backhaul-edge keys add NAME")
        return 0
    print(
        f"{'name':<20} {'state':<8} {'expires':<20} {'rpm':>6} {'tpm':>8} {'conc':>4} "
        f"{'budget':>12} {'spent':>18} {'cloud':<12}  models"
    )
    for key, row in zip(keys.keys, rows, strict=True):
        print(
            f"{key.name:<20} {row['state']:<8} {row['expires'] or '-':<20} "
            f"{key.rpm or '-':>6} {key.tpm or '-':>8} {key.max_concurrency or '-':>4} "
            f"{_budget_text(key.budget):>12} {_spent_text(row['spent']):>18} "
            f"{_cloud_text(key):<12}  "
            f"{', '.join(sorted(key.models)) or '(all allowed)'}"
        )
    return 0


def _spend(args: argparse.Namespace) -> Spend:
    path = args.budgets_path
    if path is None:
        path = EdgeSettings.load(args.config).budgets_path
    return {} if path is None else read_spend(Path(path))


def _row(key: ApiKey, now: float, spend: Spend) -> dict[str, Any]:
    state = "revoked" if not key.enabled else "expired" if key.expired(now) else "active"
    row = key.model_dump(mode="json", exclude={"hash"})
    row["state"] = state
    row["spent"] = None
    if key.budget is not None:
        period = Period.current(key.budget.period, now)
        tokens = spend.get(key.name, {}).get(period.label, 0)
        row["spent"] = {
            "period": period.label,
            "tokens": tokens,
            "percent": round(100 * tokens / key.budget.tokens, 1),
            "resets": period.end.isoformat().replace("+00:00", "Z"),
        }
    return row


def _budget_text(budget: Budget | None) -> str:
    if budget is None:
        return "-"
    n = budget.tokens
    amount = f"{n // 1_000_000}M" if n % 1_000_000 == 0 else f"{n // 1000}k" if n % 1000 == 0 else n
    return f"{amount}/{budget.period}"


def _cloud_text(key: ApiKey) -> str:
    if key.local_only:
        return "local only"
    return key.fallback or "-"


def _spent_text(spent: dict[str, Any] | None) -> str:
    return "-" if spent is None else f"{spent['tokens']:,} ({spent['percent']}%)"


@_guarded
def run_revoke(args: argparse.Namespace) -> int:
    path = _keys_path(args)
    settings = _settings(args)
    elsewhere = shared_keys.shared(settings) if settings.redis_url is not None else []
    with _locked(path) as keys:
        names = [k.name for k in keys.keys]
        found = [k for k in [*keys.keys, *elsewhere] if k.name == args.name]
        if not found:
            print(f"backhaul-edge keys: no key named {args.name!r} in {path}", file=sys.stderr)
            return 1
        updated = [
            k.model_copy(update={"enabled": False}) if k.name == args.name else k for k in keys.keys
        ]
        if args.name in names:
            write_keys_file(path, KeysFile(keys=updated))
    if settings.redis_url is not None:
        shared_keys.share(settings, [found[-1].model_copy(update={"enabled": False})])
    print(f"key {args.name!r} revoked; the edge refuses it within a second", file=sys.stderr)
    return 0
