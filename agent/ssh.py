"""Settings to asyncssh client options: the one place the agent's SSH behaviour is decided.

What is fixed here, on purpose, whatever the settings say:
- the VPS host key is checked against `known_hosts` and nothing else: `config=[]` so a user's
  `~/.ssh/config` (`UserKnownHostsFile none`, `StrictHostKeyChecking no`) cannot turn the check
  off, and there is no setting that skips it;
- only the agent's own key is offered (no ssh-agent, no passwords, no keyboard-interactive);
- keepalives are on (asyncssh's default is off) and both connect and login are bounded;
- compression stays off: tokens are small and the 20 MB case is CPU-bound on the cipher;
- AES-GCM is preferred: in asyncssh it costs half of chacha20-poly1305 per packet (measured
  here: a 100-byte round trip 100 us against 197 us, bulk 229 against 120 MB/s), and every
  streamed token is a packet. Both are OpenSSH defaults, so any sshd offers them.

asyncssh sets `TCP_NODELAY` on the SSH socket and on every forwarded socket it opens, so the
agent's side never holds small writes back (the VPS side is another matter: see `tunnel.py`).
"""

from __future__ import annotations

import asyncssh

from agent.settings import AgentSettings
from shared.errors import ConfigError

# Preference order (the client's order decides); all three are in OpenSSH's default set.
CIPHERS = ("aes128-gcm@openssh.com", "aes256-gcm@openssh.com", "chacha20-poly1305@openssh.com")


def load_client_key(settings: AgentSettings) -> asyncssh.SSHKey:
    """The agent's private key.

    Error handling: a missing or unreadable key raises `ConfigError` naming the file and how to
    make one.
    """
    try:
        return asyncssh.read_private_key(settings.key_path)
    except (OSError, asyncssh.KeyImportError) as exc:
        raise ConfigError(
            f"cannot read the agent key {settings.key_path}: {exc}; "
            "make one with `backhaul-agent keygen`"
        ) from exc


def load_known_hosts(settings: AgentSettings) -> asyncssh.SSHKnownHosts:
    """The pinned VPS host key(s).

    Error handling: a missing, unreadable or empty file raises `ConfigError`: without a pinned
    key there is nothing to verify the VPS against, and the agent does not guess.
    """
    try:
        text = settings.known_hosts.read_text()
        known = asyncssh.import_known_hosts(text)
    except (OSError, ValueError) as exc:
        raise ConfigError(
            f"cannot read the pinned host keys {settings.known_hosts}: {exc}"
        ) from exc
    if not any(line.strip() and not line.lstrip().startswith("#") for line in text.splitlines()):
        raise ConfigError(
            f"{settings.known_hosts} pins no host key; add the VPS's line, e.g. "
            f"`[{settings.ssh_host}]:{settings.ssh_port} ssh-ed25519 AAAA...` "
            "(docs/deploy.md: checking the fingerprint)"
        )
    return known


def client_options(settings: AgentSettings) -> asyncssh.SSHClientConnectionOptions:
    """The options for one connection; the files are read again each time (key rotation)."""
    return asyncssh.SSHClientConnectionOptions(
        username=settings.ssh_user,
        client_keys=[load_client_key(settings)],
        known_hosts=load_known_hosts(settings),
        config=[],
        agent_path=None,
        password=None,
        kbdint_auth=False,
        gss_auth=False,
        host_based_auth=False,
        preferred_auth="publickey",
        compression_algs=None,
        encryption_algs=CIPHERS,
        connect_timeout=settings.connect_timeout,
        login_timeout=settings.login_timeout,
        keepalive_interval=settings.keepalive_interval,
        keepalive_count_max=settings.keepalive_count_max,
    )
