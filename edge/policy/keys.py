"""API keys: the file format, the hashing, and the store the edge reloads while it serves.

The keys file (`BACKHAUL_EDGE_KEYS_PATH`, JSON, written by `backhaul-edge keys`) holds one entry
per key: its name, the SHA-256 of its secret, an enabled flag, an optional expiry, a model
allowlist, its limits (requests and tokens per minute, concurrency) and an optional token budget
per UTC day or month (`edge.policy.budgets`). The secret itself is shown once by `keys add` and
stored nowhere.

Why a fast hash and not bcrypt or argon2: a secret is `bh_` plus 256 random bits, so there is
nothing to guess and nothing a slow hash would protect; a slow hash only adds its cost (tens of
ms by design) to every request. A stolen keys file gives SHA-256 digests of 256-bit secrets,
which no one can invert. The lookup is a dict lookup by digest: its timing depends on the digest
of what the caller sent, not on the stored secret, so it leaks nothing usable; the final
`hmac.compare_digest` keeps the comparison itself constant-time as well.

`KeyStore` owns the loaded keys. `watch()` (a task in the app's cleanup context) notices a new
file (by inode, size and mtime) within `interval` seconds, or at once on `request_reload()`
(SIGHUP), and swaps the whole table in one assignment: a request in flight keeps the `ApiKey` it
was admitted with, the next one sees the change. A file that does not parse is refused with one
log line and the last good keys stay in force; at start, where there are no last keys, it stops
the edge (`load_at_start`). A file that is not a regular file, or that others may write, is
refused the same way, and is never read: nothing about the keys file can block the event loop.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import os
import re
import secrets
import stat
import time
from collections.abc import Callable
from datetime import datetime
from pathlib import Path
from typing import Annotated, Literal

import orjson
import structlog
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from edge.models import canonical_model
from edge.policy.budgets import PeriodKind
from shared.atomic import replace_file
from shared.errors import ConfigError

log = structlog.get_logger(__name__)

SECRET_PREFIX = "bh_"  # noqa: S105 - a prefix, not a secret
# `bh_` + 32 random bytes in URL-safe base64 (43 characters, no padding).
_SECRET = re.compile(r"bh_[A-Za-z0-9_-]{43}")
_DIGEST_PREFIX = "sha256:"
KeyName = Annotated[str, Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")]


class Budget(BaseModel):
    """Tokens (prompt + generated) a key may use per UTC calendar day or month."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    tokens: int = Field(ge=1)
    period: PeriodKind


class ApiKey(BaseModel):
    """One key as stored (never its secret); also what an admitted request carries (`ex.key`)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    name: KeyName
    hash: str = Field(pattern=r"^sha256:[0-9a-f]{64}$")
    enabled: bool = True
    created: datetime | None = None
    expires: datetime | None = None
    # Models this key may use (canonical names); empty = every model the edge allows.
    models: frozenset[str] = frozenset()
    rpm: int | None = Field(None, ge=1)  # requests per minute
    tpm: int | None = Field(None, ge=1)  # tokens (prompt + generated) per minute
    max_concurrency: int | None = Field(None, ge=1)  # requests in flight at once
    # A cloud (`[clouds.NAME]`) this key's requests may fall back to (docs/fallback.md).
    fallback: str | None = None
    # Never to a cloud, whatever a model or a feature names: this key's prompts stay local.
    local_only: bool = False
    budget: Budget | None = None  # tokens per day or month; refused 429 once spent

    @field_validator("created", "expires")
    @classmethod
    def _aware(cls, value: datetime | None) -> datetime | None:
        if value is not None and value.tzinfo is None:
            raise ValueError("times need a UTC offset, e.g. 2027-01-01T00:00:00Z")
        return value

    @field_validator("models")
    @classmethod
    def _canonical(cls, value: frozenset[str]) -> frozenset[str]:
        return frozenset(canonical_model(m) for m in value)

    def allows_model(self, model: str) -> bool:
        return not self.models or canonical_model(model) in self.models

    def expired(self, now: float) -> bool:
        return self.expires is not None and self.expires.timestamp() <= now


class KeysFile(BaseModel):
    """The whole file: a version and the keys, names unique."""

    model_config = ConfigDict(extra="forbid")

    version: Literal[1] = 1
    keys: list[ApiKey] = []

    @field_validator("keys")
    @classmethod
    def _unique(cls, value: list[ApiKey]) -> list[ApiKey]:
        names = [k.name for k in value]
        if len(set(names)) != len(names):
            raise ValueError("two keys have the same name")
        if len({k.hash for k in value}) != len(value):
            raise ValueError("two keys have the same hash")
        return value


def new_secret() -> str:
    return SECRET_PREFIX + secrets.token_urlsafe(32)


def digest(secret: str) -> str:
    return _DIGEST_PREFIX + hashlib.sha256(secret.encode()).hexdigest()


def read_keys_file(path: Path) -> KeysFile:
    """Parse the keys file.

    Error handling: anything wrong raises `ConfigError` saying what and how to fix it: a path
    that is not a regular file (a FIFO would block the reader forever), a file others may
    write (anyone who can write it can give themselves a key), one that cannot be read, or
    one that does not parse (what is wrong, where, never the values: the file holds digests).
    """
    raw = _read_private(path)
    try:
        return KeysFile.model_validate(orjson.loads(raw))
    except orjson.JSONDecodeError as exc:
        raise ConfigError(f"the keys file {path} is not valid JSON: {exc}") from exc
    except ValidationError as exc:
        raise ConfigError(f"the keys file {path} is invalid: {_summary(exc)}") from exc


def _read_private(path: Path) -> bytes:
    """The bytes of `path`, once it is known to be a regular file only its owner may write.

    Opened with O_NONBLOCK and checked with fstat before any read: a FIFO opens at once that
    way (a blocking open would wait for a writer, on the event loop), and is refused unread.
    """
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC)
    except OSError as exc:
        raise ConfigError(f"cannot read the keys file {path}: {exc.strerror}") from exc
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise ConfigError(
                f"the keys file {path} is not a regular file ({_file_kind(st.st_mode)}); "
                "point BACKHAUL_EDGE_KEYS_PATH at the file `backhaul-edge keys add` writes"
            )
        if st.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
            mode = stat.S_IMODE(st.st_mode)
            raise ConfigError(
                f"the keys file {path} is writable by its group or by others (mode {mode:04o}): "
                f"whoever can write it can add a key; fix with `chmod 600 {path}`"
            )
        chunks: list[bytes] = []
        while chunk := os.read(fd, 1 << 16):
            chunks.append(chunk)
        return b"".join(chunks)
    except OSError as exc:
        raise ConfigError(f"cannot read the keys file {path}: {exc.strerror}") from exc
    finally:
        os.close(fd)


def _file_kind(mode: int) -> str:
    for test, kind in (
        (stat.S_ISDIR, "a directory"),
        (stat.S_ISFIFO, "a FIFO"),
        (stat.S_ISSOCK, "a socket"),
        (stat.S_ISCHR, "a character device"),
        (stat.S_ISBLK, "a block device"),
    ):
        if test(mode):
            return kind
    return "not a file"


# Problems named in a keys file error before "and N more".
_MAX_PROBLEMS = 5


def _summary(exc: ValidationError) -> str:
    """What pydantic found wrong, where, without the values (no digest, no stray secret)."""
    problems = [
        f"{'.'.join(str(part) for part in error['loc']) or 'the file'}: {error['msg']}"
        for error in exc.errors(include_url=False, include_input=False, include_context=False)
    ]
    more = len(problems) - _MAX_PROBLEMS
    shown = "; ".join(problems[:_MAX_PROBLEMS])
    return f"{shown}; and {more} more" if more > 0 else shown


def write_keys_file(path: Path, keys: KeysFile) -> None:
    """Replace the file atomically (the edge never reads half a file), readable by its owner
    only; run as root, the file keeps its owner (the edge's service user)."""
    data = orjson.dumps(
        keys.model_dump(mode="json"), option=orjson.OPT_INDENT_2 | orjson.OPT_APPEND_NEWLINE
    )
    # Run as root (editing the file of an edge that runs as its own user), the file keeps
    # its owner, so that user can still read it.
    replace_file(path, data, 0o600, keep_owner=True)


def _signature(path: Path) -> tuple[int, ...] | None:
    """What tells a new file from the one loaded: its identity, size, time, and mode (a file
    made writable by others must be refused at once, not at its next edit)."""
    try:
        st = path.stat()
    except FileNotFoundError:
        return None
    except OSError:  # there but not ours to see: the read that follows says why, once
        return (0, 0, 0, -1, 0)
    return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_mode)


class KeyStore:
    """The keys in force, looked up by the digest of a presented secret."""

    def __init__(self, path: Path, clock: Callable[[], float] = time.time) -> None:
        self.path = path
        self.clock = clock
        self.generation = 0  # bumped on every successful load
        self.present = False  # a keys file was loaded at least once
        self._by_hash: dict[str, ApiKey] = {}
        self._from_file: list[ApiKey] = []
        # Keys several edges share (`edge.cluster.keys`), by name: over the file's of that name.
        self._shared: dict[str, ApiKey] = {}
        self._seen: tuple[int, ...] | None = None
        self._wake = asyncio.Event()
        self._loaded = asyncio.Condition()

    def lookup(self, secret: str) -> ApiKey | None:
        """The key whose secret this is, enabled or not; None for anything else."""
        if not _SECRET.fullmatch(secret):
            return None
        wanted = digest(secret)
        key = self._by_hash.get(wanted)
        if key is None or not hmac.compare_digest(key.hash, wanted):
            return None
        return key

    def load_at_start(self) -> None:
        """The first load, when the edge starts: no keys file yet is allowed (every request is
        refused until one appears, and `keys.none` says so), but a keys file that is there
        and cannot be used stops the edge, since there are no last good keys to keep.

        Error handling: raises `ConfigError` saying what is wrong with the file.
        """
        self._seen = _signature(self.path)
        if self._seen is not None:
            self._install(read_keys_file(self.path))

    def load(self) -> bool:
        """Load the file if it changed since the last look; True when new keys took effect.

        Small and local, so it is read on the event loop (never blocking on it: see
        `read_keys_file`); a file that cannot be used is logged once per version of it and
        the last good keys stay.
        """
        signature = _signature(self.path)
        if signature == self._seen:
            return False
        self._seen = signature
        if signature is None:
            if self.present:
                log.warning("keys.file_missing", path=str(self.path), kept=len(self._by_hash))
            return False
        try:
            parsed = read_keys_file(self.path)
        except ConfigError as exc:
            log.error(
                "keys.reload_refused", path=str(self.path), error=str(exc), kept=len(self._by_hash)
            )
            return False
        self._install(parsed)
        return True

    def _install(self, parsed: KeysFile) -> None:
        self._from_file = list(parsed.keys)
        self.present = True
        self._combine()
        log.info("keys.loaded", path=str(self.path), keys=len(parsed.keys))

    def share(self, keys: list[ApiKey]) -> None:
        """The keys the edges share now (all of them: a revoked one is there, disabled); a
        shared key replaces the file's key of the same name."""
        self._shared = {key.name: key for key in keys}
        self._combine()

    @property
    def shared(self) -> list[ApiKey]:
        return list(self._shared.values())

    def _combine(self) -> None:
        mine = {key.name: key for key in self._from_file}
        mine.update(self._shared)
        self._by_hash = {key.hash: key for key in mine.values()}
        self.present = self.present or bool(self._shared)
        self.generation += 1

    def request_reload(self) -> None:
        """Look at the file now rather than at the next poll (SIGHUP)."""
        self._wake.set()

    async def watch(self, interval: float) -> None:
        """Reload on change, every `interval` seconds or when woken, until cancelled."""
        while True:
            try:
                async with asyncio.timeout(interval):
                    await self._wake.wait()
            except TimeoutError:
                pass
            self._wake.clear()
            try:
                changed = self.load()
            except Exception:  # a bug here must not stop every later reload, silently
                log.exception("keys.watch_failed", path=str(self.path))
                continue
            if changed:
                async with self._loaded:
                    self._loaded.notify_all()

    async def wait_generation(self, generation: int) -> None:
        """Return once keys of at least `generation` are in force (tests, tooling)."""
        async with self._loaded:
            await self._loaded.wait_for(lambda: self.generation >= generation)
