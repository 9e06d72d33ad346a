"""CPU time the processes under test spent over a run, from /proc: steadier than latency here.

On this shared 2-core machine a neighbour's burst moves a p99 by tens of percent; it hardly moves
the CPU a process spent per request. `/proc/<pid>/stat` fields 14 and 15 (utime, stime, in clock
ticks) count every thread of the process, live and exited; children are not counted, and none of
the servers works in one (an OpenSSH session is a process of its own: `descendants` finds it).
A tick is 10 ms, so a figure per request needs runs of thousands of requests or chunks.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import NamedTuple

CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
# The benchmark's own process (the load generator) in `measure`'s figures.
LOAD_GENERATOR = "load generator"


def user_system(pid: int) -> tuple[float, float]:
    """The process's user and system CPU seconds so far, its threads included."""
    fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    return int(fields[11]) / CLOCK_TICKS, int(fields[12]) / CLOCK_TICKS


def cpu_seconds(pid: int) -> float:
    user, system = user_system(pid)
    return user + system


class Process(NamedTuple):
    ppid: int
    command: str


def descendants(root: int | None = None) -> dict[int, Process]:
    """Every process below `root` (this one by default), by pid."""
    root = os.getpid() if root is None else root
    parents: dict[int, int] = {}
    commands: dict[int, str] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            ppid = int((entry / "stat").read_text().rpartition(")")[2].split()[1])
            command = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode()
        except (OSError, ValueError, IndexError):
            continue  # it exited while we looked
        parents[int(entry.name)] = ppid
        commands[int(entry.name)] = command.strip()
    found = {}
    for pid, command in commands.items():
        ancestor = parents.get(pid)
        while ancestor is not None and ancestor != root:
            ancestor = parents.get(ancestor)
        if ancestor == root:
            found[pid] = Process(parents[pid], command)
    return found


def _snapshot(pids: Mapping[int, str]) -> dict[int, float]:
    seen = {}
    for pid in pids:
        try:
            seen[pid] = cpu_seconds(pid)
        except OSError:
            continue  # exited: what it spent is gone with it
    return seen


def _own_seconds() -> float:
    times = os.times()
    return times.user + times.system


@contextmanager
def measure(pids: Mapping[int, str]) -> Iterator[dict[str, float]]:
    """CPU seconds each labelled process spent in the block, and this process's as
    `LOAD_GENERATOR`; the dict is filled when the block ends, processes with one label summed.
    A process that exits in the block is left out."""
    spent: dict[str, float] = {}
    before, own = _snapshot(pids), _own_seconds()
    yield spent
    after, own_after = _snapshot(pids), _own_seconds()
    for pid, seconds in after.items():
        if pid in before:
            label = pids[pid]
            spent[label] = spent.get(label, 0.0) + seconds - before[pid]
    spent[LOAD_GENERATOR] = own_after - own


def per_unit(spent: Mapping[str, float], units: int) -> dict[str, float]:
    """Microseconds of CPU per request (or chunk) for each process, to 0.1 µs."""
    return {label: round(seconds * 1e6 / units, 1) for label, seconds in spent.items()}
