"""`make demo`: the edge and an Ollama simulator on this machine, and a request flowing through.

Starts the simulator (the stand-in for a GPU workstation's Ollama), starts the edge on
127.0.0.1:8080 on embedded defaults, sends one non-streamed and one streamed request, prints the
answer, the X- headers and the JSONL telemetry lines, then keeps serving until Ctrl-C and says
what to `curl`. `--once` stops after the requests (the test suite runs it that way).
"""

from __future__ import annotations

import argparse
import asyncio
import signal
import socket
import sys
from pathlib import Path

import aiohttp
import orjson

from agent.simulator import SimulatorSettings, running_simulator
from edge.serve import asyncio_run, serve
from edge.settings import EdgeSettings
from shared.logging import configure_logging

MODEL = "llama3.2:1b"
HEADERS = ("X-Tok-Per-S", "X-Gen-Time", "X-Tokens", "X-Request-Id", "X-Edge-Overhead-Ms")
BOLD, DIM, RESET = ("\033[1m", "\033[2m", "\033[0m") if sys.stdout.isatty() else ("", "", "")


def port_free(host: str, port: int) -> bool:
    with socket.socket() as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError:
            return False
        return True


def say(text: str) -> None:
    print(f"\n{BOLD}== {text}{RESET}", flush=True)


async def show_requests(url: str, telemetry: Path) -> None:
    async with aiohttp.ClientSession() as http:
        say("POST /api/generate, not streamed")
        body = {"model": MODEL, "prompt": "Why is the sky blue?", "stream": False}
        async with http.post(f"{url}/api/generate", json=body) as r:
            answer = await r.json()
            print(f"status {r.status}: {answer.get('response', answer)!r}")
            for name in HEADERS:
                print(f"  {name}: {r.headers.get(name)}")

        say("POST /api/chat, streamed (tokens print as they arrive)")
        body = {"model": MODEL, "messages": [{"role": "user", "content": "Say hello."}]}
        async with http.post(f"{url}/api/chat", json=body) as r:
            async for line in r.content:
                chunk = orjson.loads(line)
                if chunk.get("done"):
                    speed = chunk["eval_count"] / chunk["eval_duration"] * 1e9
                    print(f"\n  final chunk: eval_count={chunk['eval_count']} -> {speed:.1f} tok/s")
                else:
                    print(chunk["message"]["content"], end="", flush=True)

        say(f"the telemetry lines ({telemetry})")
        await asyncio.sleep(0.2)  # the writer thread appends right after each request ends
        text = await asyncio.to_thread(telemetry.read_text)
        for line in text.splitlines()[-2:]:
            print(f"{DIM}{line}{RESET}")


async def demo(once: bool, telemetry: Path) -> int:
    host, port = "127.0.0.1", 8080
    if not port_free(host, port):
        with socket.socket() as sock:
            sock.bind((host, 0))
            port = sock.getsockname()[1]
        print(f"127.0.0.1:8080 is taken; the edge uses port {port} instead")
    sim_settings = SimulatorSettings(tok_per_s=40, ttft=0.2, reply_tokens=24)
    async with running_simulator(sim_settings) as sim:
        say(f"simulated model server (Ollama wire format) on {sim.url}")
        settings = EdgeSettings(
            host=host,
            port=port,
            upstream=sim.url,
            telemetry_path=telemetry,
            auth="none",
            demo_page=True,  # the browser page at /demo (docs/demo.html)
        )
        started = asyncio.Event()
        async with asyncio.TaskGroup() as group:
            edge_task = group.create_task(serve(settings, started))
            async with asyncio.timeout(10):
                await started.wait()
            url = f"http://{host}:{port}"
            say(f"edge on {url} -> {sim.url}")
            await show_requests(url, telemetry)
            if once:
                signal.raise_signal(signal.SIGTERM)  # serve() stops on SIGTERM, as in production
            else:
                say("serving until Ctrl-C; try:")
                print(
                    f'  curl -s {url}/api/generate -d \'{{"model": "{MODEL}", '
                    f'"prompt": "hi", "stream": false}}\' -D - \n'
                    f'  curl -sN {url}/v1/chat/completions -d \'{{"model": "{MODEL}", '
                    f'"stream": true, "messages": [{{"role": "user", "content": "hi"}}]}}\'\n'
                    f"  curl -s {url}/api/pull -d '{{}}'      # 404: admin routes never pass\n"
                    f"  open {url}/demo in a browser         # tokens streamed into a page\n"
                    f"  curl -s {url}/metrics                 # Prometheus, from loopback\n"
                    f"  tail -F {telemetry}\n"
                    f"  .venv/bin/backhaul-edge stats {telemetry}"
                )
            await edge_task
    return 0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--once", action="store_true", help="exit after the demo requests")
    parser.add_argument("--telemetry", type=Path, default=Path("var/demo-telemetry.jsonl"))
    args = parser.parse_args()
    args.telemetry.parent.mkdir(parents=True, exist_ok=True)
    configure_logging("warning", "console")
    asyncio_run(demo(args.once, args.telemetry))


if __name__ == "__main__":
    main()
