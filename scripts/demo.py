"""`make demo`: a pool of two workstations on this one machine, and requests routed between them.

What runs, each as its own process, as on a real VPS and two workstations:

    model servers  two simulators (Ollama's wire format): rtx-box's serves llama3.2:1b and
                   qwen2.5:0.5b at 60 tok/s, mac-mini's llama3.2:1b and phi3:mini at 25 tok/s
    edge           backhaul-edge serve: HTTP on 127.0.0.1:8080, its embedded SSH server on :2222
    agents         backhaul-agent run, one per workstation: each dials the edge's SSH server with
                   its own key (the key's comment is the agent's name), pins the edge's host key
                   and asks to forward 127.0.0.1:11435 (the edge's upstream); the edge gives
                   each a loopback port of its own and routes by model between them

The demo makes each agent's key (var/demo/<name>/, with its logs and status) and the edge's
host key, authorises both agents in the edge's agent-keys file, and waits until `/agents` shows
both up with their models. Then it sends a request for the model only rtx-box serves, a
streamed one for the model only mac-mini serves, and 12 at once for the model both serve; it
prints where each went (the JSONL `agent` field), the pool as `/agents` shows it, and keeps
serving until Ctrl-C. If a real Ollama answers on 127.0.0.1:11434, the demo is the one-agent
picture in front of it instead (`--simulated` keeps the two simulators). `--once` stops after
the requests (the tests run it so).
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
from collections import Counter
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import orjson

from agent.keygen import generate
from edge.upstreams.ssh_keys import load_or_create_host_key
from shared import runtime

BIN = Path(sys.executable).parent
OLLAMA = "http://127.0.0.1:11434"
HEADERS = ("X-Tok-Per-S", "X-Gen-Time", "X-Tokens", "X-Request-Id", "X-Edge-Overhead-Ms")
BOLD, DIM, RESET = ("\033[1m", "\033[2m", "\033[0m") if sys.stdout.isatty() else ("", "", "")
# Requests sent at once for the model both agents serve: three times the pool's slots (2 per
# agent, the edge's max_inflight), so both fill, and the faster one, freeing its slots sooner,
# takes more of the queue.
SPREAD = 12


@dataclass(frozen=True, slots=True)
class Member:
    """One workstation of the demo: its agent's name, what its model server serves, and where
    that server is (empty: a simulator of its own, paced at `tok_per_s`)."""

    name: str
    models: tuple[str, ...]
    tok_per_s: float = 0.0
    upstream: str = ""


POOL = (
    Member("rtx-box", ("llama3.2:1b", "qwen2.5:0.5b"), tok_per_s=60.0),
    Member("mac-mini", ("llama3.2:1b", "phi3:mini"), tok_per_s=25.0),
)


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


async def wait_pool(url: str, names: list[str], deadline_s: float = 30.0) -> list[dict[str, Any]]:
    """Poll `/agents` until every agent in `names` is up and has listed its models (bounded):
    before its models are known the pool would send it any model."""
    async with aiohttp.ClientSession() as http, asyncio.timeout(deadline_s):
        while True:
            rows = await pool_rows(http, url)
            ready = {row["name"] for row in rows if row["state"] == "up" and row["models"]}
            if ready >= set(names):
                return rows
            await asyncio.sleep(0.1)


async def pool_rows(http: aiohttp.ClientSession, url: str) -> list[dict[str, Any]]:
    """The pool as `GET /agents` shows it; empty while the edge is still starting."""
    try:
        async with http.get(f"{url}/agents") as r:
            if r.status == 200:
                rows: list[dict[str, Any]] = (await r.json())["agents"]
                return rows
    except aiohttp.ClientConnectionError:
        pass
    return []


def plan(members: list[Member]) -> tuple[str, str, str | None]:
    """The models to ask for: one only the first agent serves, one only the last serves (with
    one agent, its first model twice), and one several serve (None with one agent)."""
    counts = Counter(model for member in members for model in member.models)
    own = [next((m for m in mb.models if counts[m] == 1), mb.models[0]) for mb in members]
    shared = next((model for model, n in counts.items() if n > 1), None)
    return own[0], own[-1], shared


async def show_requests(url: str, members: list[Member], telemetry: Path) -> None:
    before = len(await asyncio.to_thread(_lines, telemetry))  # an earlier demo's lines stay
    first, last, shared = plan(members)
    async with aiohttp.ClientSession() as http:
        say(f"POST /api/generate for {first}, not streamed")
        body = {"model": first, "prompt": "Why is the sky blue?", "stream": False}
        async with http.post(f"{url}/api/generate", json=body) as r:
            answer = await r.json()
            print(f"status {r.status}: {answer.get('response', answer)!r}")
            for name in HEADERS:
                print(f"  {name}: {r.headers.get(name)}")

        say(f"POST /api/chat for {last}, streamed (tokens print as they arrive)")
        body = {"model": last, "messages": [{"role": "user", "content": "Say hello."}]}
        async with http.post(f"{url}/api/chat", json=body) as r:
            async for line in r.content:
                chunk = orjson.loads(line)
                if chunk.get("done"):
                    speed = chunk["eval_count"] / chunk["eval_duration"] * 1e9
                    print(f"\n  final chunk: eval_count={chunk['eval_count']} -> {speed:.1f} tok/s")
                else:
                    print(chunk["message"]["content"], end="", flush=True)

        sent = 2
        if shared is not None:
            say(f"{SPREAD} requests for {shared} at once (every agent serves it)")
            statuses = await asyncio.gather(*(_generate(http, url, shared) for _ in range(SPREAD)))
            print(f"statuses: {sorted(Counter(statuses).items())}")
            sent += SPREAD
        records = await new_records(telemetry, before, sent)
        show_routing(records, members)
        say("the pool (GET /agents)")
        show_table(await pool_rows(http, url))
    say(f"the telemetry lines' agent fields ({telemetry})")
    for record in records:
        agent, model, route = (str(record.get(f)) for f in ("agent", "model", "route"))
        text = f'"agent":"{agent}"'.ljust(20) + f"model={model:<13} {route:<13}"
        print(f"  {DIM}{text} {record.get('status')} {record.get('tok_per_s')} tok/s{RESET}")


async def _generate(http: aiohttp.ClientSession, url: str, model: str) -> int:
    body = {"model": model, "prompt": "Tell me about tunnels.", "stream": False}
    async with http.post(f"{url}/api/generate", json=body) as r:
        await r.read()
        return r.status


async def new_records(telemetry: Path, before: int, count: int) -> list[dict[str, Any]]:
    """The `count` telemetry lines after the first `before`, parsed (the edge appends each
    within 10 ms of its request's end)."""
    lines: list[str] = []
    async with asyncio.timeout(5):
        while len(lines) < before + count:
            await asyncio.sleep(0.05)
            lines = await asyncio.to_thread(_lines, telemetry)
    return [orjson.loads(line) for line in lines[before:]]


def _lines(path: Path) -> list[str]:
    return path.read_text().splitlines() if path.exists() else []


def show_routing(records: list[dict[str, Any]], members: list[Member]) -> None:
    say("where each model went (the JSONL `agent` field)")
    by_model: dict[str, Counter[str]] = {}
    for record in records:
        by_model.setdefault(record["model"], Counter())[record["agent"]] += 1
    for model, agents in by_model.items():
        serving = [member.name for member in members if model in member.models]
        took = ", ".join(f"{agent} took {n}" for agent, n in agents.most_common())
        print(f"  {model:<14} served by {', '.join(serving):<18} -> {took}")


def show_table(rows: list[dict[str, Any]]) -> None:
    header = ("agent", "state", "models", "loaded", "slots", "tok/s", "tokens")
    table = [header] + [
        (
            row["name"],
            row["state"],
            ",".join(row["models"]),
            ",".join(row["loaded"]),
            f"{row['in_flight']}/{row['capacity']}",
            str(row["tok_per_s"]),
            str(row["tokens"]),
        )
        for row in rows
    ]
    widths = [max(len(line[i]) for line in table) for i in range(len(header))]
    for line in table:
        cells = (cell.ljust(width) for cell, width in zip(line, widths, strict=True))
        print("  " + "  ".join(cells).rstrip())


def prepare_keys(state: Path, ssh_port: int, members: list[Member]) -> None:
    """Each agent's key (its comment is the agent's name), all authorised on the edge; the
    edge's host key, pinned in each agent's known_hosts."""
    host_key = load_or_create_host_key(state / "ssh_host_ed25519_key")
    host_line = host_key.export_public_key("openssh").decode().strip()
    public = []
    for member in members:
        home = state / member.name
        key = home / "agent_ed25519_key"
        if not key.exists():
            generate(key, member.name)
        public.append(Path(f"{key}.pub").read_text().strip())
        (home / "known_hosts").write_text(f"[127.0.0.1]:{ssh_port} {host_line}\n")
    (state / "agent_keys").write_text("".join(f"{line}\n" for line in public))


def start_member(
    stack: ExitStack, member: Member, state: Path, ssh_port: int, tunnel_port: int
) -> None:
    """Its simulator (unless it fronts a real server), then its agent."""
    home = state / member.name
    upstream = member.upstream
    if not upstream:
        sim_port = port_or_free(0)
        upstream = f"http://127.0.0.1:{sim_port}"
        args = [str(BIN / "backhaul-agent"), "simulate", "--port", str(sim_port)]
        args += ["--models", ",".join(member.models), "--tok-per-s", str(member.tok_per_s)]
        args += ["--ttft", "0.2", "--reply-tokens", "24", "--parallel", "2"]
        stack.enter_context(running(f"{member.name}'s simulator", args, {}, home / "simulator.log"))
    print(f"  {member.name}: {upstream} serving {', '.join(member.models)}")
    agent_env = {
        "BACKHAUL_AGENT_SSH_HOST": "127.0.0.1",
        "BACKHAUL_AGENT_SSH_PORT": str(ssh_port),
        "BACKHAUL_AGENT_KEY_PATH": str(home / "agent_ed25519_key"),
        "BACKHAUL_AGENT_KNOWN_HOSTS": str(home / "known_hosts"),
        "BACKHAUL_AGENT_REMOTE_BIND": f"127.0.0.1:{tunnel_port}",
        "BACKHAUL_AGENT_UPSTREAM": upstream,
        "BACKHAUL_AGENT_STATE_DIR": str(home),
        "BACKHAUL_AGENT_WARM_MODELS": orjson.dumps(list(member.models)).decode(),
    }
    agent_args = [str(BIN / "backhaul-agent"), "run"]
    stack.enter_context(running(member.name, agent_args, agent_env, home / "agent.log"))


async def demo(once: bool, state: Path, simulated: bool) -> int:
    telemetry = state / "telemetry.jsonl"
    http_port, ssh_port = port_or_free(8080), port_or_free(2222)
    tunnel_port = port_or_free(11435)
    url = f"http://127.0.0.1:{http_port}"
    model = None if simulated else await real_ollama()
    if model is not None:
        members = [Member("ollama", (model,), upstream=OLLAMA)]
        say(f"a real Ollama answers on {OLLAMA}: one agent in front of it, with its model {model}")
    else:
        members = list(POOL)
        say("two workstations, each a simulator (Ollama's wire format) behind its own agent")
    prepare_keys(state, ssh_port, members)
    with ExitStack() as stack:
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
        for member in members:
            start_member(stack, member, state, ssh_port, tunnel_port)
        say(f"edge: HTTP on {url}, SSH for the agents on 127.0.0.1:{ssh_port}")
        start = time.monotonic()
        rows = await wait_pool(url, [member.name for member in members])
        names = " and ".join(member.name for member in members)
        say(f"{names} connected in {time.monotonic() - start:.1f} s (GET /agents)")
        for row in rows:
            models = ", ".join(row["models"])
            print(f"  {row['name']}: {row['state']}, its forward at {row['url']}, serving {models}")
        await show_requests(url, members, telemetry)
        if once:
            return 0
        say("serving until Ctrl-C; try:")
        first = plan(members)[0]
        print(
            f'  curl -s {url}/api/generate -d \'{{"model": "{first}", '
            f'"prompt": "hi", "stream": false}}\' -D -\n'
            f"  curl -s {url}/agents               # the pool, loopback only\n"
            f"  curl -s {url}/api/pull -d '{{}}'      # 404: admin routes never pass\n"
            f"  open {url}/demo in a browser         # tokens streamed into a page\n"
            f"  .venv/bin/backhaul-agent status --state-dir {state / members[0].name}\n"
            f"  tail -F {telemetry}    (and {state}/edge.log, {state}/<agent>/agent.log)\n"
            f"  .venv/bin/backhaul-edge stats {telemetry}"
        )
        with runtime.stop_on_signals() as stop:
            await stop.wait()
        say("stopping the agents, the edge and the model servers")
    return 0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--once", action="store_true", help="exit after the demo requests")
    parser.add_argument("--state", type=Path, default=Path("var/demo"), help="keys, logs, JSONL")
    parser.add_argument(
        "--simulated", action="store_true", help="two simulators even if a real Ollama answers"
    )
    args = parser.parse_args()
    args.state.mkdir(parents=True, exist_ok=True)
    sys.exit(asyncio.run(demo(args.once, args.state, args.simulated)))


if __name__ == "__main__":
    main()
