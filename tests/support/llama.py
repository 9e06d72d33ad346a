"""llama.cpp's own `llama-server` on 127.0.0.1, and the pair in front of it (tests/test_llama.py).

The binary and the model (SmolLM2-135M-Instruct, Q4_1) are the ones `scripts/llama.py` builds
and fetches into its cache outside the repo; nothing here builds. `requires_llama()` skips the
tier on a machine without them, saying how to get them, except in CI (`CI` set), where a missing
binary fails (as the sshd and proxy tiers do).

- `llama_server()`: one `llama-server` process on a free loopback port, serving the model under
  `MODEL` (`--alias`), with mean-pooled embeddings on, ready once `/health` answers 200; stopped
  with SIGTERM after the block. Its output goes to a log file the failure message names.
- `pair_in_front()`: the whole pair before it: the edge with its embedded SSH server, and
  `backhaul-agent run` in its own process forwarding the edge's upstream port to llama-server.
"""

from __future__ import annotations

import os
import subprocess
import time
import urllib.request
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager, contextmanager
from pathlib import Path
from typing import Any

import pytest

from scripts.llama import locate
from tests.support.servers import Edge, free_port
from tests.support.sshd import agent_process, authorize_agent, edge_with_sshd

MODEL = "smollm2-135m"  # the `--alias` llama-server answers to and names in its listings
READY_WITHIN_S = 60.0  # loading a 98 MB model takes about a second; a busy 2-core box, more
THREADS = 2  # the machine's cores
# Slots answering at once: enough for the edge's concurrent requests to overlap in the server.
SLOTS = 4
# Context per slot is CONTEXT / SLOTS: prompts and answers here are a few dozen tokens.
CONTEXT = 2048


def requires_llama() -> pytest.MarkDecorator:
    """Skip when llama-server or the model is missing, except in CI, where the test runs and
    fails loudly instead."""
    paths = locate()
    reason = (
        f"llama-server or its model is not in {paths.model.parent}: run `make llama` "
        "(python -m scripts.llama ensure: builds it once, about 8 minutes; .ci/run does)"
    )
    missing = not (paths.server.exists() and paths.model.exists())
    return pytest.mark.skipif(missing and not os.environ.get("CI"), reason=reason)


@contextmanager
def llama_server(log_path: Path, *args: str) -> Iterator[str]:
    """Run llama-server for the block; yield its base URL once `/health` says it is ready.

    `args` are further llama-server flags. Error handling: a server that exits or is not ready
    within `READY_WITHIN_S` fails the test, with the tail of its log.
    """
    paths = locate()
    for needed in (paths.server, paths.model):
        if not needed.exists():  # in CI: the tier must run (`make llama` first)
            pytest.fail(f"{needed} is missing: run `make llama`")
    port = free_port()
    command = [
        str(paths.server),
        *("--model", str(paths.model), "--alias", MODEL),
        *("--host", "127.0.0.1", "--port", str(port)),
        *("--threads", str(THREADS), "--parallel", str(SLOTS), "--ctx-size", str(CONTEXT)),
        *("--embeddings", "--pooling", "mean"),
        *args,
    ]
    url = f"http://127.0.0.1:{port}"
    with log_path.open("wb") as log:
        proc = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT)
    try:
        _wait_ready(proc, url, log_path)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def _wait_ready(proc: subprocess.Popen[bytes], url: str, log_path: Path) -> None:
    """Poll `/health` (503 while the model loads) until 200: the server gives no other signal."""
    deadline = time.monotonic() + READY_WITHIN_S
    while proc.poll() is None and time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(f"{url}/health", timeout=2) as r:  # noqa: S310 - http, loopback
                if r.status == 200:
                    return
        except OSError:  # refused while not yet listening; HTTPError 503 while loading
            pass
        time.sleep(0.1)
    tail = log_path.read_text(errors="replace")[-2000:]
    pytest.fail(f"llama-server did not become ready (exit code {proc.poll()}):\n{tail}")


@asynccontextmanager
async def pair_in_front(url: str, tmp_path: Path, **settings: Any) -> AsyncIterator[Edge]:
    """The edge with its SSH server and the agent in its own process, forwarding to `url`;
    probed once through the tunnel (so the edge knows the server speaks only OpenAI's API).
    `settings` are the edge's."""
    bind = free_port()
    authorize_agent(tmp_path)
    async with (
        edge_with_sshd(bind, tmp_path, probe_interval=60, **settings) as e,
        # The agent's own probes stay out of the way of the requests counted.
        agent_process(tmp_path, e.sshd, bind, url, probe_interval="60"),
    ):
        assert (await e.agent.monitor.probe(e.edge.sessions.pooled)).value == "up"
        yield e
