"""The edge's embedded SSH server: the VPS end of the tunnel without system sshd (DESIGN.md §2).

It accepts only the public keys in `settings.agent_keys` (authorized_keys format, read again on
every login so keys change without a restart) and grants one thing: `tcpip-forward` for the
loopback address agents are configured to ask for (`settings.upstream`). Each key line's comment
names its agent (`ssh-ed25519 AAAA... rtx-box`; a line without one is named by its key's
fingerprint), and every agent gets a forward of its own: the edge binds it on the address asked
for when that is free, else on a loopback port the kernel picks, and keeps the port an agent had
for its next connection. The pool (`edge.upstreams.pool`) hears each agent's forward come
(`attach(name, url)`) and go (`detach(name)`). Sessions (shell, exec,
subsystems, PTYs), direct-tcpip and local forwards, UNIX sockets, agent and X11 forwarding are
refused, each with an `sshd.refused` event. The host key lives at `settings.ssh_host_key` and
is made on first start; its fingerprint and known_hosts line are logged for the agent to pin.

Newest wins, per agent name: a new connection authenticated as the same agent replaces the old
one at once (disconnected with `REPLACED_REASON`, its listener closed, the port free before the
new forward is bound), as frp's runID and rathole do, so there is never a stale bind to wait
out. Server keepalives drop a silent agent after interval x (count_max + 1). Presence is exact:
the pool hears of a forward when it is bound and when its connection ends.
asyncssh sets TCP_NODELAY on the SSH socket and on every forwarded socket, so no Nagle stall.

The listener is the edge's own (`loop.create_server`), with asyncssh's connection behind
`edge.policy.admission.guarded`: a connection past the caps (per address, in total, unauthenticated
ones as sshd's MaxStartups, handshakes per address) is closed at accept, before asyncssh does any
work for it. Only modern algorithms are offered (`KEX_ALGS`, `MAC_ALGS`, `CIPHER_ALGS`).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable

import asyncssh
import structlog

from edge.policy.admission import Admission, Ticket, ssh_admission
from edge.policy.listeners import guarded
from edge.settings import EdgeSettings
from edge.upstreams.channels import Tunnel, Tunnels
from edge.upstreams.forward import AgentConnection, listen
from edge.upstreams.ssh_keys import agent_name, agent_names, load_or_create_host_key
from shared.protocol import REPLACED_REASON
from shared.settings import url_address

log = structlog.get_logger(__name__)

# Algorithms offered, strongest first, each kept only if this asyncssh supports it: hybrid
# post-quantum and curve25519 key exchange, NIST curves and the larger finite-field groups for
# old clients; encrypt-then-MAC with SHA-2 only. No SHA-1 (`diffie-hellman-group14-sha1`,
# `hmac-sha1`), no 64-bit tags (`umac-64`), no CBC ciphers.
_KEX_PREFERRED = (
    "mlkem768x25519-sha256",
    "sntrup761x25519-sha512",
    "sntrup761x25519-sha512@openssh.com",
    "curve25519-sha256",
    "curve25519-sha256@libssh.org",
    "ecdh-sha2-nistp256",
    "ecdh-sha2-nistp384",
    "ecdh-sha2-nistp521",
    "diffie-hellman-group16-sha512",
    "diffie-hellman-group18-sha512",
    "diffie-hellman-group14-sha256",
)
MAC_ALGS = ("hmac-sha2-256-etm@openssh.com", "hmac-sha2-512-etm@openssh.com")
CIPHER_ALGS = (
    "chacha20-poly1305@openssh.com",
    "aes256-gcm@openssh.com",
    "aes128-gcm@openssh.com",
    "aes256-ctr",
    "aes128-ctr",
)
KEX_ALGS = tuple(alg for alg in _KEX_PREFERRED if alg.encode() in asyncssh.kex.get_kex_algs())
# Connections the kernel may queue for accept (as edge.policy.admission's HTTP listener).
_BACKLOG = 1024
# Seconds to wait for a replaced connection to release the port before refusing the new bind.
_REPLACE_TIMEOUT_S = 2.0


def upstream_bind(upstream: str) -> tuple[str, int]:
    """The loopback host and port an agent may ask to listen on: the edge's upstream URL."""
    host, port = url_address(upstream)
    return host.lower(), port


# Called with an agent's name and its forward's base URL when the forward is bound, and with its
# name alone when its connection ends.
Attach = Callable[[str, str], object]
Detach = Callable[[str], object]


class EmbeddedSSHServer:
    """The listener, the agent connections, and the forward each agent holds."""

    def __init__(
        self,
        settings: EdgeSettings,
        attach: Attach | None = None,
        detach: Detach | None = None,
        *,
        port: int | None = None,
        tunnels: Tunnels | None = None,
    ) -> None:
        self._settings = settings
        self._attach = attach or (lambda _name, _url: None)
        self._detach = detach or (lambda _name: None)
        self._port = settings.ssh_port if port is None else port
        self.bind = upstream_bind(settings.upstream)
        self.connections: set[AgentConnection] = set()
        self._by_name: dict[str, AgentConnection] = {}
        self.holders: dict[str, AgentConnection] = {}  # agent name -> its forward's connection
        self._ports: dict[str, int] = {}  # agent name -> the loopback port it had last
        self.admission: Admission = ssh_admission(settings)
        self._listener: asyncio.Server | None = None
        self.fingerprint = ""
        self.host_public_key = ""
        self._changed = asyncio.Event()
        # Each bound forward, for the edge's client to open its channels in-process.
        self.tunnels = tunnels if tunnels is not None else Tunnels()

    @property
    def port(self) -> int:
        assert self._listener is not None, "start() first"
        port: int = self._listener.sockets[0].getsockname()[1]
        return port

    @property
    def present(self) -> bool:
        """Some agent holds a forward."""
        return bool(self.holders)

    @property
    def holder(self) -> AgentConnection | None:
        """The connection holding a forward, when exactly one does (one agent, the tests)."""
        return next(iter(self.holders.values())) if len(self.holders) == 1 else None

    def names(self) -> list[str]:
        """The agents the agent-keys file names now."""
        return sorted(set(agent_names(self._settings.agent_keys).values()))

    async def start(self) -> None:
        """Listen; logs the host key's fingerprint and known_hosts line for the agent to pin."""
        s = self._settings
        key = load_or_create_host_key(s.ssh_host_key)
        self.fingerprint = key.get_fingerprint("sha256")
        self.host_public_key = key.export_public_key("openssh").decode().strip()
        options = await asyncssh.SSHServerConnectionOptions.construct(
            server_factory=lambda: _AgentServer(self),
            server_host_keys=[key],
            kex_algs=list(KEX_ALGS),
            mac_algs=list(MAC_ALGS),
            encryption_algs=list(CIPHER_ALGS),
            keepalive_interval=s.ssh_keepalive_interval,
            keepalive_count_max=s.ssh_keepalive_count_max,
            login_timeout=s.ssh_login_timeout,
            allow_pty=False,
            agent_forwarding=False,
            x11_forwarding=False,
            allow_scp=False,
            password_auth=False,
            kbdint_auth=False,
            gss_host=None,
            host_based_auth=False,
            compression_algs=None,
        )
        loop = asyncio.get_running_loop()

        def connection() -> asyncssh.SSHServerConnection:
            # What asyncssh.listen() makes per accepted connection; built only once admitted.
            return asyncssh.SSHServerConnection(loop, options)

        self._listener = await loop.create_server(
            guarded(connection, self.admission), s.ssh_host, self._port, backlog=_BACKLOG
        )
        bind = f"{self.bind[0]}:{self.bind[1]}"
        log.info(
            "sshd.listening",
            address=f"{s.ssh_host}:{self.port}",
            forward=bind,
            agent_keys=str(s.agent_keys),
            agents=self.names(),
            fingerprint=self.fingerprint,
            known_hosts_line=f"[<this-vps>]:{self.port} {self.host_public_key}",
        )

    async def wait_present(self, present: bool = True, name: str | None = None) -> None:
        """Return once an agent (`name`, or any) holds a forward (or, with False, once none
        does)."""
        while (name in self.holders if name else self.present) is not present:
            self._changed.clear()
            await self._changed.wait()

    def _notify(self) -> None:
        self._changed.set()

    async def close(self) -> None:
        """Stop listening, then close every connection (they outlive the listener)."""
        if self._listener is not None:
            self._listener.close()
        for agent in list(self.connections):
            agent.conn.close()
        if self._listener is not None:
            await self._listener.wait_closed()
        self.admission.close()
        for agent in list(self.connections):
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(1.0):
                    await agent.closed.wait()

    def authorized_keys(self) -> asyncssh.SSHAuthorizedKeys | None:
        path = self._settings.agent_keys
        try:
            return asyncssh.read_authorized_keys(str(path))
        except (OSError, ValueError) as exc:
            log.error("sshd.agent_keys_unreadable", path=str(path), error=str(exc))
            return None

    # Called by _AgentServer.

    def authenticated(self, agent: AgentConnection, ticket: Ticket | None) -> None:
        if ticket is not None:
            self.admission.authenticated(ticket)  # no longer counts as a startup
        old = self._by_name.get(agent.name)
        self._by_name[agent.name] = agent
        log.info("sshd.agent_connected", agent=agent.name, peer=agent.peer, key=agent.fingerprint)
        if old is not None and old is not agent:
            log.warning("sshd.agent_replaced", agent=agent.name, old_peer=old.peer)
            # Not DISC_BY_APPLICATION: asyncssh reports that as a clean close and drops the reason.
            old.conn.disconnect(asyncssh.DISC_TOO_MANY_CONNECTIONS, REPLACED_REASON)

    async def grant_forward(
        self, agent: AgentConnection, host: str, port: int
    ) -> bool | asyncssh.SSHListener:
        """Bind the forward for `agent`, or refuse it (False)."""
        if (host.lower(), port) != self.bind:
            log.warning(
                "sshd.refused",
                what="tcpip-forward",
                listen=f"{host}:{port}",
                allowed=f"{self.bind[0]}:{self.bind[1]}",
                peer=agent.peer,
            )
            return False
        holder = self.holders.get(agent.name)
        if holder is not None and holder is not agent:
            try:  # the same agent's old connection is closing (authenticated() replaced it)
                async with asyncio.timeout(_REPLACE_TIMEOUT_S):
                    await holder.closed.wait()
            except TimeoutError:
                return False
        if agent.bound or agent.closed.is_set():
            return False
        listener = await self._listen(agent, host, port)
        if listener is None:
            return False
        if agent.closed.is_set():  # it ended while the port was being bound
            listener.close()
            return False
        agent.bound = True
        self.holders[agent.name] = agent
        bound = listener.get_port()
        self._ports[agent.name] = bound
        log.info(
            "sshd.forward_bound",
            agent=agent.name,
            listen=f"{host}:{bound}",
            peer=agent.peer,
            key=agent.fingerprint,
        )
        self.tunnels.add(self.bind[0], bound, Tunnel(agent.conn, host, port))
        self._notify()
        self._attach(agent.name, f"http://{_url_host(self.bind[0])}:{bound}")
        return listener

    async def _listen(
        self, agent: AgentConnection, host: str, asked: int
    ) -> asyncssh.SSHListener | None:
        """The agent's forward on the port it had before, else the one it asks for, else any:
        the loopback port is the edge's own business, and several agents ask for the same."""
        taken = {port for name, port in self._ports.items() if name != agent.name}
        ports = [self._ports.get(agent.name), asked, 0]
        for port in dict.fromkeys(p for p in ports if p is not None and p not in taken):
            try:
                return await listen(agent, self.bind[0], port, host, asked)
            except OSError as exc:
                log.info("sshd.port_taken", agent=agent.name, port=port, error=str(exc))
        log.error("sshd.bind_failed", agent=agent.name, listen=f"{host}:{asked}")
        return None

    def closed(self, agent: AgentConnection, exc: Exception | None) -> None:
        self.connections.discard(agent)
        if self._by_name.get(agent.name) is agent:
            del self._by_name[agent.name]
        reason = "closed" if exc is None else str(exc) or type(exc).__name__
        if agent.fingerprint:
            log.info(
                "sshd.agent_disconnected",
                agent=agent.name,
                peer=agent.peer,
                key=agent.fingerprint,
                reason=reason,
            )
        agent.release()
        bound = self._ports.get(agent.name)
        if bound is not None:
            self.tunnels.remove(self.bind[0], bound, agent.conn)
        if self.holders.get(agent.name) is agent:
            del self.holders[agent.name]
            self._notify()
            self._detach(agent.name)
        agent.closed.set()


def _url_host(host: str) -> str:
    return f"[{host}]" if ":" in host else host


class _AgentServer(asyncssh.SSHServer):
    """One connection's policy: public keys from the file, one forward, nothing else."""

    def __init__(self, server: EmbeddedSSHServer) -> None:
        self._server = server
        self._agent: AgentConnection | None = None
        self._keys: asyncssh.SSHAuthorizedKeys | None = None
        self._accepted_key = ""
        self._accepted_name = ""
        self._ticket: Ticket | None = None

    def connection_made(self, conn: asyncssh.SSHServerConnection) -> None:
        peer = conn.get_extra_info("peername") or ("?", 0)
        self._ticket = self._server.admission.ticket(peer)
        self._agent = AgentConnection(conn, peer=f"{peer[0]}:{peer[1]}")
        self._server.connections.add(self._agent)

    def connection_lost(self, exc: Exception | None) -> None:
        if self._agent is not None:
            self._server.closed(self._agent, exc)

    def begin_auth(self, username: str) -> bool:
        self._keys = self._server.authorized_keys()
        return True

    def public_key_auth_supported(self) -> bool:
        return True

    def validate_public_key(self, username: str, key: asyncssh.SSHKey) -> bool:
        agent = self._agent
        if self._keys is None or agent is None:
            return False
        host, _, _ = agent.peer.rpartition(":")
        if self._keys.validate(key, host, host) is None:
            log.warning(
                "sshd.refused", what="key", key=key.get_fingerprint("sha256"), peer=agent.peer
            )
            return False
        self._accepted_key = key.get_fingerprint("sha256")
        self._accepted_name = agent_names(self._server._settings.agent_keys).get(
            key.public_data, agent_name(key)
        )
        return True

    def auth_completed(self) -> None:
        assert self._agent is not None
        self._agent.fingerprint = self._accepted_key
        self._agent.name = self._accepted_name
        self._server.authenticated(self._agent, self._ticket)

    def session_requested(self) -> bool:
        self._refuse("session (shell, exec, subsystem, pty)")
        return False

    def connection_requested(
        self, dest_host: str, dest_port: int, orig_host: str, orig_port: int
    ) -> bool:
        self._refuse("direct-tcpip", dest=f"{dest_host}:{dest_port}")
        return False

    def unix_connection_requested(self, dest_path: str) -> bool:
        self._refuse("direct-streamlocal", dest=dest_path)
        return False

    def unix_server_requested(self, listen_path: str) -> bool:
        self._refuse("streamlocal-forward", listen=listen_path)
        return False

    def server_requested(
        self, listen_host: str, listen_port: int
    ) -> Awaitable[bool | asyncssh.SSHListener]:
        assert self._agent is not None
        return self._server.grant_forward(self._agent, listen_host, listen_port)

    def _refuse(self, what: str, **fields: str) -> None:
        peer = self._agent.peer if self._agent else "?"
        log.warning("sshd.refused", what=what, peer=peer, **fields)
