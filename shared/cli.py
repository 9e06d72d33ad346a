"""The command line both programs share: `backhaul-edge COMMAND` and `backhaul-agent COMMAND`.

Each command module exposes `register(subparsers)`, which adds its parser and sets `func`, a
callable taking the parsed arguments and returning the exit status. `add_command` is how a command
with a long description adds its parser: the description is printed as written, its line breaks
and lists kept, since argparse would otherwise refill it into one paragraph.
"""

from __future__ import annotations

import argparse
from typing import TypeAlias

# What `register` is handed: the `add_subparsers()` of the program's own parser. A string, since
# argparse's class is generic only to type checkers, not at run time.
Subparsers: TypeAlias = "argparse._SubParsersAction[argparse.ArgumentParser]"


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
