"""The agent off Linux: its start-up with the POSIX-only names taken away, as on Windows, and
what it does differently per OS (the key's ACL, the default paths, sd_notify's absence).

No Windows or Mac here: `WINDOWS_LIKE` is a sitecustomize that removes from a real agent process
what Windows lacks (SIGHUP, os.getuid and friends, AF_UNIX, uvloop, the loop's
`add_signal_handler`, which raises NotImplementedError on Windows' loops) and refuses the
POSIX-only modules (fcntl, termios, pwd, ...) to our own packages. Libraries keep theirs: on
Windows they take their own Windows branch (asyncssh's misc.py does), which this cannot show.
"""

from __future__ import annotations

import asyncio
import os
import signal
import stat
import sys
from pathlib import Path, PureWindowsPath

import orjson

from agent import platforms
from agent.status import STATUS_FILE
from shared.notify import Notifier
from simulator.serve import running_simulator
from tests.support.servers import free_port
from tests.support.sshd import authorize_agent, embedded_server, generate_via, pin

AGENT = str(Path(sys.executable).parent / "backhaul-agent")

WINDOWS_LIKE = """
import builtins, os, sys
_POSIX_ONLY = {"fcntl", "termios", "pwd", "grp", "resource", "posix"}
_OURS = ("agent", "shared", "simulator")
_import = builtins.__import__

def _guarded(name, globals=None, locals=None, fromlist=(), level=0):
    importer = (globals or {}).get("__name__", "")
    if name.split(".")[0] in _POSIX_ONLY and importer.split(".")[0] in _OURS:
        raise ImportError(f"{name} is POSIX-only (imported by {importer})")
    return _import(name, globals, locals, fromlist, level)

builtins.__import__ = _guarded
sys.modules["uvloop"] = None  # no Windows wheel: the default loop
import asyncio, asyncio.unix_events, signal, socket
del signal.SIGHUP
for name in ("getuid", "geteuid", "getgid", "getegid", "getpgid", "setsid"):
    delattr(os, name)
# Windows has socketpair() (emulated over TCP) for the loop's wakeup; keep it working here.
_af_unix, _socketpair = socket.AF_UNIX, socket.socketpair
def socketpair(family=None, type=socket.SOCK_STREAM, proto=0):
    return _socketpair(_af_unix if family is None else family, type, proto)
socket.socketpair = socketpair
del socket.AF_UNIX
_loop = asyncio.unix_events._UnixSelectorEventLoop
_loop.add_signal_handler = asyncio.AbstractEventLoop.add_signal_handler
_loop.remove_signal_handler = asyncio.AbstractEventLoop.remove_signal_handler
with open(os.environ["WINDOWS_LIKE_APPLIED"], "w") as marker:
    marker.write("applied")
"""


async def test_the_agent_starts_forwards_and_stops_on_ctrl_c_without_posix_names(
    tmp_path: Path,
):
    site = tmp_path / "site"
    site.mkdir()
    (site / "sitecustomize.py").write_text(WINDOWS_LIKE)
    bind = free_port()
    authorize_agent(tmp_path)
    async with running_simulator() as sim, embedded_server(tmp_path, bind) as vps:
        pin(tmp_path / "known_hosts", vps.port, vps.server.host_public_key)
        env = {
            **os.environ,
            "PYTHONPATH": str(site),
            "WINDOWS_LIKE_APPLIED": str(tmp_path / "applied"),
            # Windows sets it in every process; getpass.getuser() (asyncssh's) reads it there.
            "USERNAME": "alice",
            # Set, as a careless environment might: without AF_UNIX it must be ignored.
            "NOTIFY_SOCKET": str(tmp_path / "notify.sock"),
            "BACKHAUL_AGENT_SSH_PORT": str(vps.port),
            "BACKHAUL_AGENT_SSH_USER": "agent",
            "BACKHAUL_AGENT_KEY_PATH": str(tmp_path / "agent_key"),
            "BACKHAUL_AGENT_KNOWN_HOSTS": str(tmp_path / "known_hosts"),
            "BACKHAUL_AGENT_REMOTE_BIND": f"127.0.0.1:{bind}",
            "BACKHAUL_AGENT_UPSTREAM": sim.url,
            "BACKHAUL_AGENT_STATE_DIR": str(tmp_path),
            "BACKHAUL_AGENT_LOG_FORMAT": "json",
        }
        proc = await asyncio.create_subprocess_exec(
            AGENT, "run", env=env, stderr=asyncio.subprocess.PIPE
        )
        assert proc.stderr is not None
        lines: list[bytes] = []
        try:
            async with asyncio.timeout(20):
                await vps.wait_present(True)
                # The VPS binds before the agent has taken the forward in: wait for its side.
                while b'"agent.ready"' not in (lines[-1] if lines else b""):
                    lines.append(await proc.stderr.readline())
                    assert lines[-1], lines  # the agent ended before it was ready
            response = await generate_via(bind)
            assert response.status == 200
            proc.send_signal(signal.SIGINT)  # what Ctrl-C, and WinSW's stop, raise
            async with asyncio.timeout(5):
                lines += (await proc.stderr.read()).splitlines()
                assert await proc.wait() == 0
                await vps.wait_present(False)
        finally:
            if proc.returncode is None:
                proc.kill()
                await proc.wait()
    assert (tmp_path / "applied").read_text() == "applied"
    events = [orjson.loads(line)["event"] for line in lines if line.startswith(b"{")]
    assert {"tunnel.up", "agent.stopping", "agent.stopped"} <= set(events), lines
    assert not [line for line in lines if b"Traceback" in line]
    status = orjson.loads((tmp_path / STATUS_FILE).read_bytes())
    assert status["connected"] is False and status["connects"] == 1


def test_the_windows_key_acl_is_the_user_system_and_administrators():
    key = PureWindowsPath(r"C:\ProgramData\backhaul\agent_ed25519_key")
    assert platforms.key_acl_command(key, "DESKTOP-1\\alice") == [
        "icacls",
        str(key),
        "/inheritance:r",
        "/grant:r",
        "DESKTOP-1\\alice:F",
        "*S-1-5-18:F",  # SYSTEM, the service's account
        "*S-1-5-32-544:F",  # Administrators
    ]


def test_a_private_key_left_readable_is_made_owner_only(tmp_path: Path):
    key = tmp_path / "agent_key"
    key.write_text("secret")
    key.chmod(0o644)
    platforms.protect_private_key(key)
    assert stat.S_IMODE(key.stat().st_mode) == 0o600


def test_default_paths_follow_the_os():
    assert str(platforms.default_config_file(platforms.LINUX)) == "/etc/backhaul/agent.toml"
    windows = platforms.default_config_file(platforms.WINDOWS)
    assert isinstance(windows, PureWindowsPath)
    assert windows.parts[-2:] == ("backhaul", "agent.toml")
    assert str(platforms.default_state_dir(platforms.WINDOWS)).endswith(r"\backhaul\state")
    mac = platforms.base_dir(platforms.MACOS, root=False)
    assert mac == Path.home() / "Library" / "Application Support" / "backhaul"
    assert str(platforms.base_dir(platforms.MACOS, root=True)) == (
        "/Library/Application Support/backhaul"
    )


def test_a_notifier_without_a_socket_says_nothing_and_never_fails():
    notifier = Notifier(None)
    assert notifier.ready("up") is False
    assert notifier.watchdog_interval is None
