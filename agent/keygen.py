"""`backhaul-agent keygen`: the agent's ed25519 key pair and the lines that authorize it.

Writes the private key (mode 0600, or on Windows an ACL for this user, SYSTEM and Administrators;
never overwritten without `--force`) and `<key>.pub`, then
prints the public key, the `authorized_keys` line for system-sshd mode and the line for the
edge's agent-keys file. Run on an existing key it only prints, so the lines can be shown again.

The system-sshd line is locked down: `restrict` turns off every forwarding and the PTY,
`port-forwarding` turns forwarding back on, `permitlisten` allows exactly the one loopback
listen address, and `command="/bin/false"` replaces any command the key asks for (`restrict`
alone still allows exec).
"""

from __future__ import annotations

import argparse
import getpass
import os
import socket
import sys
from pathlib import Path

import asyncssh

from agent import platforms
from agent.settings import AgentSettings
from shared.cli import Subparsers, add_command
from shared.errors import ConfigError


def authorized_keys_line(public_key: str, remote_bind: str) -> str:
    """The system-sshd `authorized_keys` line for `public_key` (OpenSSH one-line format)."""
    options = f'restrict,port-forwarding,permitlisten="{remote_bind}",command="/bin/false"'
    return f"{options} {public_key.strip()}"


def generate(path: Path, comment: str) -> asyncssh.SSHKey:
    """Make an ed25519 key pair at `path` and `path.pub`; the private file is created 0600."""
    key = asyncssh.generate_private_key("ssh-ed25519", comment=comment)
    path.parent.mkdir(parents=True, exist_ok=True)
    # O_BINARY (Windows only): os.open's text mode there would write every newline as CRLF.
    flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC | getattr(os, "O_BINARY", 0)
    fd = os.open(path, flags, 0o600)
    with os.fdopen(fd, "wb") as out:
        out.write(key.export_private_key("openssh"))
    # O_CREAT's mode does not apply to an existing file (--force), nor anywhere on Windows.
    platforms.protect_private_key(path)
    Path(f"{path}.pub").write_bytes(key.export_public_key("openssh"))
    return key


def register(subparsers: Subparsers) -> None:
    parser = add_command(
        subparsers,
        "keygen",
        "make the agent's key pair and print the lines that authorize it",
        __doc__,
    )
    parser.add_argument("--config", type=Path, help="TOML settings file")
    parser.add_argument("--key-path", type=Path, help="private key file (default: key_path)")
    parser.add_argument("--remote-bind", help="VPS loopback host:port (default: remote_bind)")
    parser.add_argument("--comment", help="key comment (default: backhaul-agent@<host>)")
    parser.add_argument("--force", action="store_true", help="replace an existing key")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    try:
        settings = AgentSettings.load_args(args, "key_path", "remote_bind")
    except ConfigError as exc:
        print(f"backhaul-agent keygen: {exc}", file=sys.stderr)
        return 2
    path = settings.key_path
    comment = args.comment or f"backhaul-agent@{socket.gethostname()}"
    if path.exists() and not args.force:
        try:
            key = asyncssh.read_private_key(path)
        except (OSError, asyncssh.KeyImportError) as exc:
            print(f"backhaul-agent keygen: cannot read {path}: {exc}", file=sys.stderr)
            return 2
        print(f"# {path} exists (use --force to replace it); its lines:", file=sys.stderr)
    else:
        key = generate(path, comment)
        print(f"# wrote {path} (0600) and {path}.pub", file=sys.stderr)
    public = key.export_public_key("openssh").decode().strip()
    fingerprint = key.get_fingerprint("sha256")
    user = settings.ssh_user or getpass.getuser()
    print(
        f"# public key ({fingerprint})\n{public}\n\n"
        f"# system sshd mode: append to ~{user}/.ssh/authorized_keys on the VPS\n"
        f"{authorized_keys_line(public, settings.remote_bind)}\n\n"
        "# embedded server mode: append to the edge's agent-keys file (BACKHAUL_EDGE_AGENT_KEYS)\n"
        f"{public}"
    )
    return 0
