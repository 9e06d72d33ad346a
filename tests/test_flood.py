"""No anonymous take-down (issue 8): one address holding thousands of connections to each of
the edge's ports does not stop a normal client from being served, through the tunnel.

The edge runs as a process of its own, started with systemd's default soft descriptor limit
(1,024) under a higher hard one, as a unit without `LimitNOFILE` gets it. Before the fix 1,100
idle connections to either port exhausted its descriptors and every tunnelled request failed.
The attackers (`tests.support.flood.Flood`, one process per port) connect from 127.0.0.2 and reopen
every connection the edge closes, as a real one would; the agent and the normal client connect
from 127.0.0.1, the client on a new connection for each request. With the caps set out of reach
(100,000 each) this test fails: the edge runs out of descriptors and resets the normal client's
first request. The attacker this test had before opened its connections once: against an edge
without caps (hard limit 4,096) the agent and the client still got through, into the
descriptors the SSH login timeout freed.
"""

from __future__ import annotations

import asyncio
import os
import resource
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from pathlib import Path

import aiohttp

from simulator.serve import running_simulator
from tests.support import flood, processes
from tests.support.metrics import scrape, total
from tests.support.processes import notify_socket
from tests.support.servers import free_port
from tests.support.sshd import GEN, agent_settings, authorize_agent, running_tunnel

SOFT = 1024  # systemd's default soft limit
HARD = 2048  # the edge raises its soft limit to this: below one flood alone
PER_ADDRESS = 256  # the edge's default max_connections_per_address
COUNT = 3000  # connections each attacker tries to hold: each more than HARD
REQUESTS = 10  # the normal client's, through the tunnel
SSH_PER_ADDRESS = 3  # its default ssh_max_startups_per_address


@contextmanager
def edge_process(tmp_path: Path, bind: int, hard: int) -> Iterator[tuple[int, int, int]]:
    """`backhaul-edge serve` with its SSH server on; yields (pid, HTTP port, SSH port) once it
    has said READY=1."""
    ssh_port = free_port()
    with (
        notify_socket(tmp_path, timeout_s=30) as notify,
        processes.edge_process(
            tmp_path,
            notify=notify,
            nofile=(min(SOFT, hard), hard),  # systemd's default soft limit, under `hard`
            upstream=f"http://127.0.0.1:{bind}",
            ssh_port=str(ssh_port),
            ssh_host_key=str(tmp_path / "ssh_host_ed25519_key"),
            agent_keys=str(tmp_path / "agent_keys"),
            log_level="warning",
        ) as (proc, port),
    ):
        assert "READY=1" in notify.recv(4096).decode()
        yield proc.pid, port, ssh_port


async def refusals(http: aiohttp.ClientSession, port: int) -> dict[str, float]:
    """listener -> connections the edge refused at accept, from its /metrics."""
    samples = await scrape(http, f"http://127.0.0.1:{port}")
    refused = "backhaul_connections_refused_total"
    return {listener: total(samples, refused, listener=listener) for listener in ("http", "ssh")}


async def test_a_normal_client_is_served_while_one_address_floods_both_ports(tmp_path: Path):
    # The attackers are processes of their own, each with up to `count` sockets; the edge is
    # started with systemd's default soft limit and the hard limit it may raise it to.
    hard = min(HARD, resource.getrlimit(resource.RLIMIT_NOFILE)[1])
    assert resource.getrlimit(resource.RLIMIT_NOFILE)[1] >= COUNT + 64, "hard limit too low"
    authorize_agent(tmp_path)
    bind = free_port()
    timeout = aiohttp.ClientTimeout(total=10)
    async with running_simulator() as sim, aiohttp.ClientSession(timeout=timeout) as http:
        with (
            edge_process(tmp_path, bind, hard) as (pid, port, ssh_port),
            flood.flooding(port, COUNT) as on_http,
            flood.flooding(ssh_port, COUNT) as on_ssh,
        ):
            # Until the edge has refused a flood's worth on each port (bounded: an edge without
            # caps never refuses, and what follows is what shows it).
            with suppress(TimeoutError):
                async with asyncio.timeout(10):
                    while True:
                        seen = await refusals(http, port)
                        if min(seen.get("http", 0), seen.get("ssh", 0)) >= COUNT:
                            break
                        await asyncio.sleep(0.1)
            host_key = (tmp_path / "ssh_host_ed25519_key.pub").read_text().strip()
            agent = agent_settings(
                tmp_path, ssh_port, f"127.0.0.1:{bind}", sim.url, pinned=host_key
            )
            # The agent gets in and binds its forward, and requests go through it, each on a new
            # connection (one kept alive from before would need no new descriptor), while the
            # attackers reopen every connection the edge closes.
            async with (
                running_tunnel(agent, up_within=10),
                aiohttp.ClientSession(
                    connector=aiohttp.TCPConnector(force_close=True),
                    timeout=aiohttp.ClientTimeout(total=5),
                ) as client,
            ):
                for _ in range(REQUESTS):
                    async with client.post(f"http://127.0.0.1:{port}/api/generate", json=GEN) as r:
                        assert r.status == 200, await r.text()
                        assert (await r.json())["done"] is True
            # The flood holds the per-address caps' worth of the edge's descriptors (the rest:
            # the edge's own files and listeners, the agent's connection, its forward).
            assert len(os.listdir(f"/proc/{pid}/fd")) <= PER_ADDRESS + SSH_PER_ADDRESS + 64
            seen = await refusals(http, port)
            http_flood, ssh_flood = on_http.stop(), on_ssh.stop()
    # Every connection past the caps was refused, and the attackers came back for more.
    assert seen["http"] >= COUNT and seen["ssh"] >= COUNT
    assert http_flood.attempts > COUNT and ssh_flood.attempts > COUNT, (http_flood, ssh_flood)
