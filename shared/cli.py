"""The command line both programs share: `backhaul-edge COMMAND` and `backhaul-agent COMMAND`.

Each program's `__main__` is one call to `main(prog, description, commands, argv)`. Each command
module exposes `register(subparsers)`, which adds its parser and sets `func`, a callable taking
the parsed arguments and returning the exit status. `add_command` is how a command with a long
description adds its parser: the description is printed as written, its line breaks and lists
kept, since argparse would otherwise refill it into one paragraph.
"""

from __future__ import annotations

import argparse
from collections.abc import Iterable, Sequence
from typing import Protocol, TypeAlias

# What `register` is handed: the `add_subparsers()` of the program's own parser. A string, since
# argparse's class is generic only to type checkers, not at run time.
Subparsers: TypeAlias = "argparse._SubParsersAction[argparse.ArgumentParser]"


class Command(Protocol):
    """A command's module: `register` adds its parser and sets `func` (args -> exit status)."""

    def register(self, subparsers: Subparsers, /) -> None: ...


def main(
    prog: str, description: str | None, commands: Iterable[Command], argv: Sequence[str] | None
) -> int:
    """Parse `argv` (None: the process's arguments) and run the command it names; its exit
    status. argparse exits 2 itself on a command line it cannot parse."""
    parser = argparse.ArgumentParser(prog=prog, description=description)
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for command in commands:
        command.register(subparsers)
    args = parser.parse_args(argv)
    status: int = args.func(args)
    return status


def add_command(
    subparsers: Subparsers, name: str, summary: str, description: str | None
) -> argparse.ArgumentParser:
    """Add the parser of command `name`: `summary` in the program's list of commands,
    `description` (printed as written) in its own `--help`."""
    return subparsers.add_parser(
        name,
        help=summary,
        description=description,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
