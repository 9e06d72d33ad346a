"""Real nginx and Caddy in front of the edge, configured by the recipes in docs/deploy.md.

The recipe text is read from the docs' fenced `nginx` and `caddy` blocks, so what is tested is
what an operator copies. Only what cannot hold on a test machine is changed, and each change
must find its text exactly once (a reworded recipe fails here rather than being half-tested):

- nginx: `listen 443 ssl` becomes `listen 127.0.0.1:<free port> ssl`, the Let's Encrypt
  certificate a self-signed one for `llm.example.com` made in the test's directory, and the
  edge's `127.0.0.1:8080` its port-0 address. The server block sits in a minimal main file
  (temp paths and pid in the test's directory, no access log) instead of Debian's nginx.conf.
- Caddy: only the edge's address. Global options in front of the site block put it on a free
  port on 127.0.0.1 with its admin API off, and make its own local CA sign the certificate
  (`local_certs`) instead of Let's Encrypt; its storage is in the test's directory.

Both run in the foreground as child processes of the test and are stopped at the end. Clients
reach them as `https://llm.example.com:<port>` through a resolver that names 127.0.0.1, trusting
the test certificate, from a chosen loopback source address (any of 127.0.0.0/8 is this host),
so that two clients behind one proxy are two addresses to the edge.
"""

from __future__ import annotations

import asyncio
import datetime
import getpass
import os
import re
import socket
import ssl
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager, suppress
from dataclasses import dataclass
from pathlib import Path

import aiohttp
import pytest
from aiohttp.abc import AbstractResolver, ResolveResult
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from tests.support.servers import free_port

DEPLOY = Path(__file__).resolve().parents[2] / "docs" / "deploy.md"
SITE = "llm.example.com"  # the recipes' server name, kept: clients resolve it to 127.0.0.1
EDGE_IN_RECIPES = "127.0.0.1:8080"
BINARIES = {"nginx": Path("/usr/sbin/nginx"), "caddy": Path("/usr/bin/caddy")}


def requires(proxy: str) -> pytest.MarkDecorator:
    """Skip a test of `proxy` when its binary is missing, except in CI (`CI` set), where the
    test must run and fail loudly instead."""
    binary = BINARIES[proxy]
    reason = f"{binary} is not installed (apt-get install {proxy}; .ci/run does)"
    missing = not binary.exists() and not os.environ.get("CI")
    return pytest.mark.skipif(missing, reason=reason)


def recipe(language: str) -> str:
    """The one fenced block of `language` in docs/deploy.md."""
    blocks = re.findall(rf"^```{language}\n(.*?)^```$", DEPLOY.read_text(), re.M | re.S)
    assert len(blocks) == 1, f"docs/deploy.md: expected one ```{language} block"
    text: str = blocks[0]
    return text


def substitute(text: str, changes: dict[str, str]) -> str:
    for old, new in changes.items():
        assert text.count(old) == 1, f"the recipe no longer has {old!r} exactly once"
        text = text.replace(old, new)
    return text


def self_signed(directory: Path) -> tuple[Path, Path]:
    """A certificate for `SITE` signed by its own key (nginx's test certificate): cert, key."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, SITE)])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName(SITE)]), critical=False)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    cert_path, key_path = directory / "fullchain.pem", directory / "privkey.pem"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    key_path.chmod(0o600)
    return cert_path, key_path


class Loopback(AbstractResolver):
    """Resolves every name to 127.0.0.1: `llm.example.com` is this machine, as /etc/hosts
    would say, so the URL, SNI and Host header are the ones a real client sends."""

    async def resolve(
        self, host: str, port: int = 0, family: socket.AddressFamily = socket.AF_INET
    ) -> list[ResolveResult]:
        flags = socket.AI_NUMERICHOST | socket.AI_NUMERICSERV
        return [
            ResolveResult(
                hostname=host,
                host="127.0.0.1",
                port=port,
                family=socket.AF_INET,
                proto=0,
                flags=flags,
            )
        ]

    async def close(self) -> None:
        return None


@dataclass
class Proxy:
    kind: str
    url: str  # https://llm.example.com:<port>
    trust: ssl.SSLContext  # trusts the proxy's certificate
    log: Path  # the proxy's own stderr

    def client(self, source: str) -> aiohttp.ClientSession:
        """A session whose connections come from `source` (a loopback address)."""
        connector = aiohttp.TCPConnector(
            ssl=self.trust, resolver=Loopback(), local_addr=(source, 0)
        )
        return aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=30))


def nginx_files(directory: Path, port: int, edge_url: str) -> tuple[list[str], Path]:
    """The nginx command line and the certificate to trust, for the docs' recipe."""
    cert, key = self_signed(directory)
    server = substitute(
        recipe("nginx"),
        {
            "listen 443 ssl;": f"listen 127.0.0.1:{port} ssl;",
            f"/etc/letsencrypt/live/{SITE}/fullchain.pem": str(cert),
            f"/etc/letsencrypt/live/{SITE}/privkey.pem": str(key),
            f"http://{EDGE_IN_RECIPES}": edge_url,
        },
    )
    temp = "\n".join(
        f"    {name}_temp_path {directory / name};"
        for name in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi")
    )
    # Run as root (here and in CI), nginx's workers would drop to `nobody`, who cannot enter
    # the test's 0700 directory for its temp files; as anyone else the directive is ignored.
    user = f"user {getpass.getuser()};" if os.geteuid() == 0 else ""
    config = directory / "nginx.conf"
    config.write_text(
        f"{user}\nworker_processes 1;\nevents {{ worker_connections 128; }}\n"
        f"http {{\n    access_log off;\n{temp}\n\n{server}}}\n"
    )
    command = [
        str(BINARIES["nginx"]), "-p", str(directory), "-c", str(config), "-e", "stderr",
        "-g", f"daemon off; pid {directory / 'nginx.pid'}; error_log stderr;",
    ]  # fmt: skip
    return command, cert


def caddy_files(directory: Path, port: int, edge_url: str) -> tuple[list[str], Path]:
    """The Caddy command line and its local CA's root certificate, for the docs' recipe."""
    site = substitute(recipe("caddy"), {EDGE_IN_RECIPES: edge_url.removeprefix("http://")})
    config = directory / "Caddyfile"
    config.write_text(
        "{\n"
        "    admin off\n"
        "    local_certs\n"  # Caddy's own CA signs the certificate instead of Let's Encrypt
        "    skip_install_trust\n"  # and stays out of the system's trust store
        f"    https_port {port}\n"
        "    default_bind 127.0.0.1\n"
        "    auto_https disable_redirects\n"  # no listener on port 80
        "    servers {\n        protocols h1 h2\n    }\n"  # no HTTP/3 listener on UDP
        "}\n\n" + site
    )
    command = [str(BINARIES["caddy"]), "run", "--config", str(config), "--adapter", "caddyfile"]
    return command, directory / "data/caddy/pki/authorities/local/root.crt"


@dataclass
class Launch:
    """What starting one proxy takes, written to its directory before anything runs."""

    kind: str
    command: list[str]
    env: dict[str, str]
    url: str  # https://llm.example.com:<port>
    ca: Path  # the certificate a client trusts (Caddy writes its CA's once it has made it)
    log: Path  # the proxy's stdout and stderr

    @classmethod
    def prepare(cls, kind: str, directory: Path, edge_url: str) -> Launch:
        directory.mkdir(parents=True, exist_ok=True)
        port = free_port()
        files = nginx_files if kind == "nginx" else caddy_files
        command, ca = files(directory, port, edge_url)
        env = {
            **os.environ,
            "HOME": str(directory),
            "XDG_DATA_HOME": str(directory / "data"),
            "XDG_CONFIG_HOME": str(directory / "config"),
        }
        return cls(kind, command, env, f"https://{SITE}:{port}", ca, directory / f"{kind}.log")

    def trust(self) -> ssl.SSLContext | None:
        """A client context trusting the proxy's certificate, or None while there is none.

        Caddy creates the file before it has written the certificate into it: a file that
        holds no certificate yet is "none yet", not an error.
        """
        try:
            return ssl.create_default_context(cafile=str(self.ca))
        except (FileNotFoundError, ssl.SSLError):
            return None

    def failed(self, why: str) -> AssertionError:
        return AssertionError(f"{self.kind} {why}; its log:\n{self.log.read_text()}")


@asynccontextmanager
async def running_proxy(kind: str, directory: Path, edge_url: str) -> AsyncIterator[Proxy]:
    """`kind` ("nginx" or "caddy") in front of `edge_url`, per docs/deploy.md, until the block
    ends; ready once a request through it reaches the edge's /healthz.

    Resource handling: the process is terminated (killed after 5 s) on the way out, whatever
    the block raised.
    """
    launch = Launch.prepare(kind, directory, edge_url)
    with launch.log.open("wb") as out:
        proc = await asyncio.create_subprocess_exec(
            *launch.command, stdin=asyncio.subprocess.DEVNULL, stdout=out, stderr=out,
            env=launch.env,
        )  # fmt: skip
    try:
        yield await _wait_ready(proc, launch)
    finally:
        if proc.returncode is None:
            proc.terminate()
            try:
                async with asyncio.timeout(5):
                    await proc.wait()
            except TimeoutError:
                proc.kill()
                await proc.wait()


async def _wait_ready(proc: asyncio.subprocess.Process, launch: Launch) -> Proxy:
    # A process outside the test's loop says nothing to it when it is ready: ask, every 20 ms
    # for up to 10 s, through the proxy to the edge, so its certificate is ready too.
    try:
        async with asyncio.timeout(10):
            while proc.returncode is None:
                trust = launch.trust()
                if trust is not None:
                    proxy = Proxy(launch.kind, launch.url, trust, launch.log)
                    with suppress(aiohttp.ClientError, ssl.SSLError, OSError):
                        async with (
                            proxy.client("127.0.0.1") as http,
                            http.get(f"{launch.url}/healthz") as r,
                        ):
                            if r.status == 200:
                                return proxy
                await asyncio.sleep(0.02)
    except TimeoutError:
        raise launch.failed("was not serving after 10 s") from None
    raise launch.failed(f"exited {proc.returncode}")
