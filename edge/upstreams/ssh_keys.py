"""The embedded SSH server's keys: its own host key, and its agents' names.

The host key is made on first start (`load_or_create_host_key`). The agents' names come from
the agent-keys file (authorized_keys format):
each key line's comment names its agent (`ssh-ed25519 AAAA... rtx-box`): the name the pool, the
telemetry and the metrics know it by (docs/second-workstation.md). Two lines with one name are
one agent (the newest connection wins); a line without a comment is named by its key.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import asyncssh
import structlog

from shared.errors import ConfigError

log = structlog.get_logger(__name__)


def agent_names(path: Path) -> dict[bytes, str]:
    """Each public key in an authorized_keys file, by its key blob, with its agent's name: the
    line's comment, else `agent-` and the start of its fingerprint. Unreadable lines are left
    to `asyncssh.read_authorized_keys`, which refuses their keys."""
    names: dict[bytes, str] = {}
    try:
        lines = path.read_text().splitlines()
    except OSError:
        return names
    for line in lines:
        match = _KEY_IN_LINE.search(line)
        if match is None or line.lstrip().startswith("#"):
            continue
        try:
            key = asyncssh.import_public_key(match.group(0))
        except (asyncssh.KeyImportError, ValueError):
            continue
        names[key.public_data] = agent_name(key)
    return names


def agent_name(key: asyncssh.SSHKey) -> str:
    comment = key.get_comment() or ""
    cleaned = _NAME_UNSAFE.sub("-", comment.strip())[:64].strip("-")
    if cleaned:
        return cleaned
    return "agent-" + key.get_fingerprint("sha256").removeprefix("SHA256:")[:8]


# A key type and its base64 blob, and the comment after it, wherever options put them.
_KEY_IN_LINE = re.compile(r"(?:ssh|ecdsa|sk)-[A-Za-z0-9@.-]+\s+[A-Za-z0-9+/=]+(?:\s+.*)?$")
_NAME_UNSAFE = re.compile(r"[^A-Za-z0-9._@-]+")


def load_or_create_host_key(path: Path) -> asyncssh.SSHKey:
    """The server's host key; an ed25519 key is made (mode 0600, plus `.pub`) if missing.

    Error handling: an unreadable key raises `ConfigError` naming the file.
    """
    if path.exists():
        try:
            return asyncssh.read_private_key(path)
        except (OSError, asyncssh.KeyImportError) as exc:
            raise ConfigError(f"cannot read the SSH host key {path}: {exc}") from exc
    key = asyncssh.generate_private_key("ssh-ed25519", comment="backhaul-edge")
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as out:
        out.write(key.export_private_key("openssh"))
    Path(f"{path}.pub").write_bytes(key.export_public_key("openssh"))
    log.info("sshd.host_key_created", path=str(path))
    return key
