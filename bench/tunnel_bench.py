"""`python -m bench.tunnel_bench`: the whole pair, edge -> tunnel -> model server, in both modes.

Paths measured, every server a separate process on 127.0.0.1, the load generated here:
  direct           client -> simulator
  tunnel embedded  client -> edge's embedded SSH server forward -> agent -> simulator
  tunnel sshd      client -> OpenSSH sshd forward -> agent -> simulator
  edge+embedded    client -> edge (embedded SSH server on) -> forward -> agent -> simulator
  edge+sshd        client -> edge -> OpenSSH sshd forward -> agent -> simulator
  ssh -R           client -> sshd forward -> OpenSSH `ssh -N -R` client -> simulator
  nginx+ssh -R     client -> nginx -> the same `ssh -N -R` forward -> simulator
The two `ssh -R` rows are the do-it-yourself baseline (skipped if nginx or ssh is missing).

W1: non-streamed /api/generate, 64 tokens, concurrency 1 and 32 (p50/p99, req/s), `--rounds`
rounds alternating the paths; per path the round with the median figure is kept.
W2: streamed, 256 tokens at 290 tok/s, 64 streams in flight: time to first byte.
Bulk: a 20 MB streamed response (a blob server stands in for the model server): MB/s.
CPU (issue 15, bench/cpu.py): every process's utime + stime from /proc over a W1 run at
concurrency 32 per request, and over each path's W2 run per relayed chunk (the NDJSON lines the
client read); the embedded SSH server is inside the edge's process, OpenSSH's side is the sshd
session process (and `ssh -N -R`), nginx is there as the reference. W2 also runs as a burst
(64 streams started together, `--rounds` times pooled) for issue 15's TTFB target.
Targets (issue 3): W1 c=1 p99 within 2 ms of direct; c=32 >= 25% of direct's req/s;
20 MB at >= 150 MB/s; issue 15's for the pair (edge+embedded) are printed too (bench/run.py).
Every run is bounded by a request count and `load.RUN_DEADLINE_S`.
"""

from __future__ import annotations

import argparse
import asyncio
import getpass
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any

import aiohttp
import asyncssh
from aiohttp import web

from bench import cli, cpu, load, procs
from bench import run as edge_bench

AGENT = str(procs.BIN / "backhaul-agent")
EDGE = str(procs.BIN / "backhaul-edge")
BLOB_MB = 20
# As bench/run.py: the gate out of the way (the simulator has 64 slots), no API keys.
EDGE_ENV = {"max_inflight": "64", "queue_max": "4096", "log_level": "warning", "auth": "none"}


# pid -> what it is, for the CPU breakdown (two agents and two edges look alike otherwise).
LABELS: dict[int, str] = {}


@contextmanager
def process(
    args: list[str], port: int, log: Path, env: dict[str, str] | None = None
) -> Iterator[None]:
    """`procs.process` with stderr to `log`, its pid labelled for the CPU breakdown."""
    with procs.process(args, port, env, log) as pid:
        LABELS[pid] = log.stem  # edge-embedded, agent-sshd, sshd, ssh, nginx, blob
        yield


def write_key(path: Path) -> str:
    key = asyncssh.generate_private_key("ssh-ed25519")
    path.write_bytes(key.export_private_key("openssh"))
    path.chmod(0o600)
    public = key.export_public_key("openssh").decode().strip()
    Path(f"{path}.pub").write_text(public + "\n")
    return public


@contextmanager
def sshd(tmp: Path, agent_pub: str, agent_bind: int, ssh_pub: str, ssh_bind: int) -> Iterator[int]:
    """OpenSSH sshd configured as docs/deploy.md says, for the current user; yields its port."""
    port = procs.free_port()
    host_pub = write_key(tmp / "sshd_host_key")
    lines = [
        f'restrict,port-forwarding,permitlisten="127.0.0.1:{agent_bind}",command="/bin/false" '
        f"{agent_pub}",
        f'restrict,port-forwarding,permitlisten="127.0.0.1:{ssh_bind}",command="/bin/false" '
        f"{ssh_pub}",
    ]
    (tmp / "authorized_keys").write_text("\n".join(lines) + "\n")
    config = tmp / "sshd_config"
    config.write_text(
        f"Port {port}\nListenAddress 127.0.0.1\nHostKey {tmp}/sshd_host_key\n"
        f"PidFile {tmp}/sshd.pid\nAuthorizedKeysFile {tmp}/authorized_keys\nStrictModes no\n"
        "UsePAM yes\nPasswordAuthentication no\nKbdInteractiveAuthentication no\n"
        "PermitRootLogin prohibit-password\nAllowTcpForwarding no\nPermitTTY no\n"
        f"X11Forwarding no\nLogLevel ERROR\nMatch User {getpass.getuser()}\n"
        f"    AllowTcpForwarding remote\n    PermitListen 127.0.0.1:{agent_bind} "
        f"127.0.0.1:{ssh_bind}\n    ClientAliveInterval 10\n    ClientAliveCountMax 3\n"
    )
    if os.geteuid() == 0:
        Path("/run/sshd").mkdir(mode=0o755, exist_ok=True)
    (tmp / "sshd_known_hosts").write_text(f"[127.0.0.1]:{port} {host_pub}\n")
    with process(["/usr/sbin/sshd", "-D", "-e", "-f", str(config)], port, tmp / "sshd.log"):
        yield port


def nginx_conf(tmp: Path, port: int, upstream_port: int) -> Path:
    user = "user root;\n" if os.geteuid() == 0 else ""
    conf = tmp / "nginx.conf"
    conf.write_text(
        f"""{user}worker_processes 1;
daemon off;
pid {tmp}/nginx.pid;
error_log {tmp}/nginx.log warn;
events {{ worker_connections 4096; }}
http {{
    access_log off;
    client_body_temp_path {tmp}/nginx_body;
    proxy_temp_path {tmp}/nginx_proxy;
    upstream tunnel {{ server 127.0.0.1:{upstream_port}; keepalive 64; }}
    server {{
        listen 127.0.0.1:{port};
        client_max_body_size 20m;
        location / {{
            proxy_pass http://tunnel;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_set_header Host 127.0.0.1;  # Ollama answers 403 to other hosts
            proxy_buffering off;
            proxy_request_buffering off;
            proxy_read_timeout 300s;
        }}
    }}
}}
"""
    )
    return conf


@contextmanager
def stack(tmp: Path, upstream: str, baseline: bool) -> Iterator[dict[str, str]]:
    """Both modes of the pair (and the baseline) in front of `upstream`; yields name -> URL."""
    tmp.mkdir(parents=True, exist_ok=True)
    agent_pub = write_key(tmp / "agent_key")
    ssh_pub = write_key(tmp / "ssh_key")
    (tmp / "agent_keys").write_text(agent_pub + "\n")
    edge_host_pub = write_key(tmp / "edge_host_key")  # the edge uses it instead of making one
    b_emb, b_sshd, b_ssh, k_emb = (procs.free_port() for _ in range(4))
    e_emb, e_sshd, n_port = (procs.free_port() for _ in range(3))
    (tmp / "edge_known_hosts").write_text(f"[127.0.0.1]:{k_emb} {edge_host_pub}\n")
    urls = {"direct": upstream}

    def edge_env(port: int, bind: int, **extra: str) -> dict[str, str]:
        values = {**EDGE_ENV, "port": str(port), "upstream": f"http://127.0.0.1:{bind}", **extra}
        (tmp / f"edge-{port}").mkdir()
        values["state_dir"] = str(tmp / f"edge-{port}")  # what is not named below, if anything
        values["telemetry_path"] = str(tmp / f"telemetry-{port}.jsonl")
        values["keys_path"] = str(tmp / f"keys-{port}.json")
        values["bans_path"] = str(tmp / f"bans-{port}.json")
        return {f"BACKHAUL_EDGE_{k.upper()}": v for k, v in values.items()}

    def agent_env(ssh_port: int, known: str, bind: int) -> dict[str, str]:
        (tmp / f"agent-{bind}").mkdir()
        values = {
            "ssh_port": str(ssh_port),
            "ssh_user": getpass.getuser(),
            "key_path": str(tmp / "agent_key"),
            "known_hosts": str(tmp / known),
            "remote_bind": f"127.0.0.1:{bind}",
            "upstream": upstream,
            "state_dir": str(tmp / f"agent-{bind}"),
            "log_format": "json",
        }
        return {f"BACKHAUL_AGENT_{k.upper()}": v for k, v in values.items()}

    def mode(name: str, edge_port: int, bind: int, dials: int, known: str, **edge: str) -> None:
        """An edge, and an agent that dials `dials` (pinning `known`) to forward `bind` to it."""
        env = edge_env(edge_port, bind, **edge)
        stack_.enter_context(process([EDGE, "serve"], edge_port, tmp / f"edge-{name}.log", env))
        env = agent_env(dials, known, bind)
        stack_.enter_context(process([AGENT, "run"], bind, tmp / f"agent-{name}.log", env))
        urls[f"tunnel {name}"] = f"http://127.0.0.1:{bind}"
        urls[f"edge+{name}"] = f"http://127.0.0.1:{edge_port}"

    with ExitStack() as stack_:
        ssh_port = stack_.enter_context(sshd(tmp, agent_pub, b_sshd, ssh_pub, b_ssh))
        embedded = {
            "ssh_host_key": str(tmp / "edge_host_key"),
            "agent_keys": str(tmp / "agent_keys"),
        }
        mode("embedded", e_emb, b_emb, k_emb, "edge_known_hosts", ssh_port=str(k_emb), **embedded)
        mode("sshd", e_sshd, b_sshd, ssh_port, "sshd_known_hosts", ssh_port="0")
        if baseline:
            port = upstream.rpartition(":")[2]
            ssh_args = [
                "ssh", "-N", "-q", "-o", "ExitOnForwardFailure=yes", "-o", "BatchMode=yes",
                "-o", f"UserKnownHostsFile={tmp}/sshd_known_hosts", "-F", "none",
                "-o", "StrictHostKeyChecking=yes", "-i", str(tmp / "ssh_key"),
                "-p", str(ssh_port), "-R", f"127.0.0.1:{b_ssh}:127.0.0.1:{port}",
                f"{getpass.getuser()}@127.0.0.1",
            ]  # fmt: skip
            stack_.enter_context(process(ssh_args, b_ssh, tmp / "ssh.log"))
            urls["ssh -R"] = f"http://127.0.0.1:{b_ssh}"
            conf = nginx_conf(tmp, n_port, b_ssh)
            stack_.enter_context(
                process(["nginx", "-p", str(tmp), "-c", str(conf)], n_port, tmp / "nginx.log")
            )
            urls["nginx+ssh -R"] = f"http://127.0.0.1:{n_port}"
        _wait_ready([urls["edge+embedded"], urls["edge+sshd"]])
        yield urls


def _wait_ready(edges: list[str]) -> None:
    """Until each edge's /readyz says 200 (its probe has seen the model server)."""

    async def wait() -> None:
        async with aiohttp.ClientSession() as session, asyncio.timeout(30):
            for url in edges:
                while True:
                    async with session.get(f"{url}/readyz") as r:
                        if r.status == 200:
                            break
                    await asyncio.sleep(0.1)

    asyncio.run(wait())


# The blob server: a stand-in model server whose streamed answer is BLOB_MB megabytes.


def blob_app(megabytes: int) -> web.Application:
    line = b'{"model":"blob","response":"' + b"x" * (1024 * 1024 - 40) + b'","done":false}\n'
    final = b'{"model":"blob","response":"","done":true,"eval_count":1,"eval_duration":1}\n'

    async def version(_request: web.Request) -> web.Response:
        return web.json_response({"version": "0.0.0-blob"})

    async def generate(request: web.Request) -> web.StreamResponse:
        await request.read()
        response = web.StreamResponse(headers={"Content-Type": "application/x-ndjson"})
        await response.prepare(request)
        for _ in range(megabytes):
            await response.write(line)
        await response.write(final)
        await response.write_eof()
        return response

    app = web.Application()
    app.router.add_get("/api/version", version)
    app.router.add_post("/api/generate", generate)
    return app


@contextmanager
def blob_server(tmp: Path) -> Iterator[str]:
    port = procs.free_port()
    args = [sys.executable, "-m", "bench.tunnel_bench", "--serve-blob", str(port)]
    with process(args, port, tmp / "blob.log"):
        yield f"http://127.0.0.1:{port}"


async def bulk(url: str, count: int) -> list[float]:
    """`count` streamed 20 MB answers, one at a time; MB/s (1e6 bytes) of each."""
    body = {"model": "blob", "prompt": "x", "stream": True}
    rates = []
    async with aiohttp.ClientSession() as session, asyncio.timeout(load.RUN_DEADLINE_S):
        for _ in range(count):
            start = time.perf_counter()
            size = 0
            async with session.post(f"{url}/api/generate", json=body) as r:
                async for chunk in r.content.iter_any():
                    size += len(chunk)
            assert r.status == 200, r.status
            assert size >= BLOB_MB * 1024 * 1024, size
            rates.append(size / 1e6 / (time.perf_counter() - start))
    return rates


def w1_all(
    urls: dict[str, str], concurrency: int, total: int, rounds: int
) -> dict[str, dict[str, float]]:
    """Each path run right after its own direct run, `rounds` times; medians of the pairs.

    Pairing matters on a shared 2-core machine: background load drifts between runs, and a
    ratio of two figures taken minutes apart measures the drift as much as the path.
    """
    for url in urls.values():  # warm-up: connections, SSH windows, caches
        load.run(load.w1(url, concurrency, min(total, 200)))
    pairs: dict[str, list[tuple[load.Result, load.Result]]] = {name: [] for name in urls}
    for _ in range(rounds):
        for name, url in urls.items():
            if name == "direct":
                continue
            direct = load.run(load.w1(urls["direct"], concurrency, total))
            result = load.run(load.w1(url, concurrency, total))
            if result.errors or direct.errors:
                raise RuntimeError(f"{name}: {result.errors} failed requests")
            pairs[name].append((direct, result))
            pairs["direct"].append((direct, direct))
    out = {}
    for name, runs in pairs.items():
        out[name] = {
            "rps": statistics.median(r.rps for _, r in runs),
            "p50_ms": statistics.median(r.p50 for _, r in runs),
            "p99_ms": statistics.median(r.p99 for _, r in runs),
            "added_p50_ms": statistics.median(r.p50 - d.p50 for d, r in runs),
            "added_p99_ms": statistics.median(r.p99 - d.p99 for d, r in runs),
            "rps_ratio": statistics.median(r.rps / d.rps for d, r in runs),
        }
    return out


def _labelled() -> dict[int, str]:
    """Every process below this one, by its label or its nearest labelled ancestor's (nginx's
    worker, sshd's sessions), else its command line."""
    tree = cpu.descendants()
    out = {}
    for pid, proc in tree.items():
        ancestor = pid
        while ancestor in tree and ancestor not in LABELS:
            ancestor = tree[ancestor].ppid
        label = LABELS.get(ancestor, proc.command[:40])
        if "simulate" in proc.command:
            label = "simulator"
        elif label == "sshd" and "sshd:" in proc.command:
            label = "sshd session"
        out[pid] = label
    return out


def _shown(spent: dict[str, float], units: int, floor_us: float) -> dict[str, float]:
    """µs per unit for each process that spent at least `floor_us` per unit (the others idle)."""
    return {k: v for k, v in cpu.per_unit(spent, units).items() if v >= floor_us}


def cpu_breakdown(urls: dict[str, str], total: int) -> dict[str, dict[str, float]]:
    """CPU microseconds per request, by process, for W1 at concurrency 32 on each path.

    From /proc (clock ticks of 10 ms): with 3000 requests the resolution is about 3 us.
    """
    out = {}
    for name, url in urls.items():
        load.run(load.w1(url, 32, 200))
        with cpu.measure(_labelled()) as spent:
            load.run(load.w1(url, 32, total))
        out[name] = _shown(spent, total, 5.0)
    return out


def w2_all(urls: dict[str, str], streams: int, rounds: int) -> dict[str, dict[str, Any]]:
    """Per path: a steady W2 run (TTFB, CPU per relayed chunk by process), then `rounds` bursts
    of `streams` started together, alternating the paths (TTFB pooled, added vs direct's)."""
    out: dict[str, dict[str, Any]] = {}
    for name, url in urls.items():
        with cpu.measure(_labelled()) as spent:
            r = load.run(load.w2(url, streams))
        if r.errors:
            raise RuntimeError(f"{name}: {r.errors} failed streams")
        out[name] = {
            "ttfb_p50_ms": r.p50,
            "ttfb_p99_ms": r.p99,
            "streams": r.requests,
            "chunks": r.chunks,
            "cpu_us_per_chunk": _shown(spent, r.chunks, 0.2),
        }
    bursts: dict[str, list[float]] = {name: [] for name in urls}
    for _ in range(rounds):
        for name, url in urls.items():
            r = load.run(load.w2(url, streams, burst=True))
            if r.errors:
                raise RuntimeError(f"{name}: {r.errors} failed streams in a burst")
            bursts[name] += r.latencies_ms
    pooled = {name: load.Result(len(v), 0, 1, v) for name, v in bursts.items()}
    for name, r in pooled.items():
        out[name]["burst_ttfb_p50_ms"] = r.p50
        out[name]["burst_ttfb_p99_ms"] = r.p99
        out[name]["burst_added_ttfb_p99_ms"] = r.p99 - pooled["direct"].p99
    return out


def main() -> None:
    parser = cli.parser(__doc__, requests=1000, requests_help="W1 requests per run")
    parser.add_argument("--bulk", type=int, default=5, help="20 MB transfers per path")
    parser.add_argument("--serve-blob", type=int, metavar="PORT", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve_blob:
        web.run_app(blob_app(BLOB_MB), host="127.0.0.1", port=args.serve_blob, print=None)
        return
    baseline = bool(shutil.which("nginx") and shutil.which("ssh"))
    if not baseline:
        print("nginx or ssh not installed: the ssh -R baseline is skipped")
    results: dict[str, object] = {"loadavg_start": os.getloadavg()[0]}
    with tempfile.TemporaryDirectory() as tmp_dir:
        tmp = Path(tmp_dir)
        with procs.simulator() as sim, stack(tmp / "w1", sim, baseline) as urls:
            for concurrency in (1, 32):
                total = args.requests if concurrency == 1 else 2 * args.requests
                figures = w1_all(urls, concurrency, total, args.rounds)
                results[f"w1_c{concurrency}"] = figures
                _print_w1(concurrency, figures)
            results["cpu_us_per_request_c32"] = cpu = cpu_breakdown(urls, 3 * args.requests)
            _print_cpu(cpu)
        with procs.simulator(tok_per_s=290) as sim, stack(tmp / "w2", sim, baseline) as urls:
            paths = ("direct", "edge+embedded", "edge+sshd", "ssh -R", "nginx+ssh -R")
            figures = w2_all({k: v for k, v in urls.items() if k in paths}, 64, args.rounds)
            results["w2"] = figures
            _print_w2(figures)
        with blob_server(tmp) as blob, stack(tmp / "bulk", blob, baseline) as urls:
            rates = {name: asyncio.run(bulk(url, args.bulk)) for name, url in urls.items()}
            results["bulk_mb_s"] = {k: statistics.median(v) for k, v in rates.items()}
            _print_bulk(results["bulk_mb_s"])  # type: ignore[arg-type]
    results["loadavg_end"] = os.getloadavg()[0]
    _print_targets(results)
    issue_15 = {mode: _issue_15(results, mode) for mode in ("embedded", "sshd")}
    results["issue_15"] = issue_15
    for mode, pair in issue_15.items():
        edge_bench.print_targets(f"the pair, edge+{mode}", pair)
    print(
        f"1-min load average {results['loadavg_start']:.2f} at start, "
        f"{results['loadavg_end']:.2f} at the end (2 cores; above ~1 the neighbours are busy)"
    )
    if args.json:
        print(json.dumps(results, indent=2))


def _print_w1(concurrency: int, figures: dict[str, dict[str, float]]) -> None:
    print(f"W1 /api/generate 64 tokens, concurrency {concurrency} (medians; vs the paired direct)")
    for name, f in figures.items():
        print(
            f"  {name:<16} {f['rps']:7.0f} req/s  p50 {f['p50_ms']:6.2f} ms  "
            f"p99 {f['p99_ms']:6.2f} ms  (p99 {f['added_p99_ms']:+6.2f} ms, "
            f"{f['rps_ratio']:4.0%} of direct req/s)"
        )


def _print_cpu(figures: dict[str, dict[str, float]]) -> None:
    print("CPU per request (us), W1 concurrency 32, by process (>= 5 us)")
    for name, costs in figures.items():
        parts = ", ".join(f"{k} {v:.0f}" for k, v in sorted(costs.items(), key=lambda kv: -kv[1]))
        print(f"  {name:<16} total {sum(costs.values()):5.0f}: {parts}")


def _print_w2(figures: dict[str, dict[str, Any]]) -> None:
    print(
        "W2 streamed, 256 tokens at 290 tok/s, 64 streams: time to first byte in flight "
        "(steady) and started together (burst); CPU per relayed chunk (us, >= 0.2) by process"
    )
    for name, f in figures.items():
        print(
            f"  {name:<16} p50 {f['ttfb_p50_ms']:6.2f} ms  p99 {f['ttfb_p99_ms']:6.2f} ms  "
            f"burst p50 {f['burst_ttfb_p50_ms']:6.2f} ms  p99 {f['burst_ttfb_p99_ms']:6.2f} ms"
        )
        costs = f["cpu_us_per_chunk"]
        parts = ", ".join(f"{k} {v:.1f}" for k, v in sorted(costs.items(), key=lambda kv: -kv[1]))
        print(f"  {'':<16} {f['chunks']} chunks, CPU total {sum(costs.values()):.1f}: {parts}")


def _print_bulk(rates: dict[str, float]) -> None:
    print(f"Bulk: one {BLOB_MB} MiB streamed answer at a time (median)")
    for name, rate in rates.items():
        print(f"  {name:<16} {rate:7.0f} MB/s")


def _issue_15(r: dict[str, Any], mode: str) -> dict[str, float]:
    """Issue 15's figures for the pair in `mode` ("embedded" or "sshd"), as bench/run.py's."""
    c1, c32, w2 = r["w1_c1"][f"edge+{mode}"], r["w1_c32"][f"edge+{mode}"], r["w2"][f"edge+{mode}"]
    figures = [
        c32["rps_ratio"],
        c1["added_p50_ms"],
        c1["added_p99_ms"],
        w2["burst_added_ttfb_p99_ms"],
        r["cpu_us_per_request_c32"][f"edge+{mode}"].get(f"edge-{mode}", 0.0),
        w2["cpu_us_per_chunk"].get(f"edge-{mode}", 0.0),
    ]
    return dict(zip(edge_bench.ISSUE_15, figures, strict=True))


def _print_targets(r: dict[str, object]) -> None:
    c1, c32, bulk_ = r["w1_c1"], r["w1_c32"], r["bulk_mb_s"]
    assert isinstance(c1, dict)
    assert isinstance(c32, dict)
    assert isinstance(bulk_, dict)
    print("Targets")
    for mode in ("edge+embedded", "edge+sshd"):
        added, ratio = c1[mode]["added_p99_ms"], c32[mode]["rps_ratio"]
        print(
            f"  {mode:<14} c=1 p99 {added:+.2f} ms (<= 2: {'ok' if added <= 2 else 'MISSED'})"
            f"  c=32 {ratio:.0%} of direct (>= 25%: {'ok' if ratio >= 0.25 else 'MISSED'})"
            f"  20 MB {bulk_[mode]:.0f} MB/s (>= 150: {'ok' if bulk_[mode] >= 150 else 'MISSED'})"
        )


if __name__ == "__main__":
    main()
