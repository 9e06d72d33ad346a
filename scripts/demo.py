"""`make demo`: the whole pair on this one machine, and a request flowing through the tunnel.

What runs, each as its own process, as on a real VPS and workstation:

    model server  a real Ollama if one answers on 127.0.0.1:11434, else the simulator
    edge          backhaul-edge serve: HTTP on 127.0.0.1:8080, its embedded SSH server on :2222
    agent         backhaul-agent run: dials the edge's SSH server, pins its host key, and holds
                  the reverse forward 127.0.0.1:11435 (the edge's upstream) -> the model server

The demo makes the agent's key and the edge's host key (in var/demo/), pins them on each side,
waits until /readyz says the agent is connected, sends one non-streamed and one streamed request
through the tunnel, prints the answer, the X- headers and the JSONL lines, then keeps serving
until Ctrl-C and says what to try. `--once` stops after the requests (the tests run it so).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path

import aiohttp
import orjson

from agent.keygen import generate
from edge.upstreams.sshd import load_or_create_host_key
from shared import runtime

BIN = Path(sys.executable).parent
OLLAMA = "http://127.0.0.1:11434"
HEADERS = ("X-Tok-Per-S", "X-Gen-Time", "X-Tokens", "X-Request-Id", "X-Edge-Overhead-Ms")
BOLD, DIM, RESET = ("\033[1m", "\033[2m", "\033[0m") if sys.stdout.isatty() else ("", "", "")


def say(text: str) -> None:
    print(f"\n{BOLD}== {text}{RESET}", flush=True)


def port_or_free(preferred: int) -> int:
    """`preferred` if nothing listens there, else any free loopback port."""
    with socket.socket() as sock:
        try:
            sock.bind(("127.0.0.1", preferred))
        except OSError:
            sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


@contextmanager
def running(name: str, args: list[str], env: dict[str, str], log: Path) -> Iterator[None]:
    """Run one program until the block ends; its log goes to `log`."""
    with log.open("wb") as out:
        # Our own installed commands, with arguments built here: no untrusted input.
        proc = subprocess.Popen(args, env={**os.environ, **env}, stdout=out, stderr=out)  # noqa: S603
        try:
            yield
        finally:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
    if proc.returncode not in (0, -signal.SIGTERM):
        print(f"{name} exited {proc.returncode}; see {log}")


async def real_ollama() -> str | None:
    """The first model of a real Ollama on 127.0.0.1:11434, or None if none answers."""
    try:
        timeout = aiohttp.ClientTimeout(total=1)
        async with (
            aiohttp.ClientSession(timeout=timeout) as http,
            http.get(f"{OLLAMA}/api/tags") as r,
        ):
            models = (await r.json()).get("models") or []
    except (aiohttp.ClientError, TimeoutError, ValueError):
        return None
    return models[0]["name"] if models else None


async def wait_ready(url: str, deadline_s: float = 30.0) -> dict[str, object]:
    """Poll /readyz until the agent's forward answers (bounded)."""
    async with aiohttp.ClientSession() as http, asyncio.timeout(deadline_s):
        while True:
            try:
                async with http.get(f"{url}/readyz") as r:
                    if r.status == 200:
                        ready: dict[str, object] = await r.json()
                        return ready
            except aiohttp.ClientConnectionError:
                pass  # the edge is still starting
            await asyncio.sleep(0.1)


async def show_requests(url: str, model: str, telemetry: Path) -> None:
    before = len(await asyncio.to_thread(_lines, telemetry))  # an earlier demo's lines stay
    async with aiohttp.ClientSession() as http:
        say("POST /api/generate through the tunnel, not streamed")
        body = {"model": model, "prompt": "Why is the sky blue?", "stream": False}
        async with http.post(f"{url}/api/generate", json=body) as r:
            answer = await r.json()
            print(f"status {r.status}: {answer.get('response', answer)!r}")
            for name in HEADERS:
                print(f"  {name}: {r.headers.get(name)}")

        say("POST /api/chat through the tunnel, streamed (tokens print as they arrive)")
        body = {"model": model, "messages": [{"role": "user", "content": "Say hello."}]}
        async with http.post(f"{url}/api/chat", json=body) as r:
            async for line in r.content:
                chunk = orjson.loads(line)
                if chunk.get("done"):
                    speed = chunk["eval_count"] / chunk["eval_duration"] * 1e9
                    print(f"\n  final chunk: eval_count={chunk['eval_count']} -> {speed:.1f} tok/s")
                else:
                    print(chunk["message"]["content"], end="", flush=True)

    say(f"the telemetry lines ({telemetry})")
    lines: list[str] = []
    async with asyncio.timeout(5):  # the edge appends each line within 10 ms of the request
        while len(lines) < before + 2:
            await asyncio.sleep(0.05)
            lines = await asyncio.to_thread(_lines, telemetry)
    for text in lines[before:]:
        print(f"{DIM}{text}{RESET}")


def _lines(path: Path) -> list[str]:
    return path.read_text().splitlines() if path.exists() else []


def prepare_keys(state: Path, ssh_port: int) -> None:
    """The agent's key, authorised on the edge; the edge's host key, pinned on the agent."""
    agent_key = state / "agent_ed25519_key"
    if not agent_key.exists():
        generate(agent_key, "backhaul-demo-agent")
    public = Path(f"{agent_key}.pub").read_text().strip()
    (state / "agent_keys").write_text(public + "\n")
    host_key = load_or_create_host_key(state / "ssh_host_ed25519_key")
    host_line = host_key.export_public_key("openssh").decode().strip()
    (state / "known_hosts").write_text(f"[127.0.0.1]:{ssh_port} {host_line}\n")


async def demo(once: bool, state: Path) -> int:
    telemetry = state / "telemetry.jsonl"
    http_port, ssh_port = port_or_free(8080), port_or_free(2222)
    tunnel_port = port_or_free(11435)
    url = f"http://127.0.0.1:{http_port}"
    prepare_keys(state, ssh_port)
    model = await real_ollama()
    with ExitStack() as stack:
        if model is not None:
            upstream = OLLAMA
            say(f"a real Ollama answers on {OLLAMA}; using its model {model}")
        else:
            sim_port = port_or_free(0)
            upstream, model = f"http://127.0.0.1:{sim_port}", "llama3.2:1b"
            args = [str(BIN / "backhaul-agent"), "simulate", "--port", str(sim_port)]
            args += ["--tok-per-s", "40", "--ttft", "0.2", "--reply-tokens", "24"]
            stack.enter_context(running("simulator", args, {}, state / "simulator.log"))
            say(f"no Ollama here: the simulator (Ollama's wire format) serves on {upstream}")
        edge_env = {
            "BACKHAUL_EDGE_PORT": str(http_port),
            "BACKHAUL_EDGE_UPSTREAM": f"http://127.0.0.1:{tunnel_port}",
            "BACKHAUL_EDGE_SSH_PORT": str(ssh_port),
            # The host key and agent_keys that prepare_keys wrote; keys.json, bans.json beside.
            "BACKHAUL_EDGE_STATE_DIR": str(state),
            "BACKHAUL_EDGE_TELEMETRY_PATH": str(telemetry),
            "BACKHAUL_EDGE_AUTH": "none",  # the demo is open; real deployments use keys
            "BACKHAUL_EDGE_DEMO_PAGE": "true",
        }
        edge_args = [str(BIN / "backhaul-edge"), "serve"]
        stack.enter_context(running("edge", edge_args, edge_env, state / "edge.log"))
        say(f"edge: HTTP on {url}, SSH for the agent on 127.0.0.1:{ssh_port}")
        agent_env = {
            "BACKHAUL_AGENT_SSH_HOST": "127.0.0.1",
            "BACKHAUL_AGENT_SSH_PORT": str(ssh_port),
            "BACKHAUL_AGENT_KEY_PATH": str(state / "agent_ed25519_key"),
            "BACKHAUL_AGENT_KNOWN_HOSTS": str(state / "known_hosts"),
            "BACKHAUL_AGENT_REMOTE_BIND": f"127.0.0.1:{tunnel_port}",
            "BACKHAUL_AGENT_UPSTREAM": upstream,
            "BACKHAUL_AGENT_STATE_DIR": str(state),
            "BACKHAUL_AGENT_WARM_MODELS": orjson.dumps([model]).decode(),
        }
        agent_args = [str(BIN / "backhaul-agent"), "run"]
        stack.enter_context(running("agent", agent_args, agent_env, state / "agent.log"))
        start = time.monotonic()
        ready = await wait_ready(url)
        say(
            f"agent connected in {time.monotonic() - start:.1f} s: reverse forward "
            f"127.0.0.1:{tunnel_port} -> {upstream} ({ready.get('upstream')})"
        )
        await show_requests(url, model, telemetry)
        if once:
            return 0
        say("serving until Ctrl-C; try:")
        print(
            f'  curl -s {url}/api/generate -d \'{{"model": "{model}", '
            f'"prompt": "hi", "stream": false}}\' -D -\n'
            f"  curl -s {url}/api/pull -d '{{}}'      # 404: admin routes never pass\n"
            f"  open {url}/demo in a browser         # tokens streamed into a page\n"
            f"  .venv/bin/backhaul-agent status --state-dir {state}\n"
            f"  tail -F {telemetry}    (and {state}/edge.log, {state}/agent.log)\n"
            f"  .venv/bin/backhaul-edge stats {telemetry}"
        )
        with runtime.stop_on_signals() as stop:
            await stop.wait()
        say("stopping the agent, the edge and the model server")
    return 0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--once", action="store_true", help="exit after the demo requests")
    parser.add_argument("--state", type=Path, default=Path("var/demo"), help="keys, logs, JSONL")
    args = parser.parse_args()
    args.state.mkdir(parents=True, exist_ok=True)
    sys.exit(asyncio.run(demo(args.once, args.state)))


if __name__ == "__main__":
    main()
