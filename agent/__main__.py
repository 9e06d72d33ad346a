"""`backhaul-agent`: parse the command line and hand over to the command's module.

Each command module exposes `register(subparsers)`, which adds its parser and sets `func`, a
callable taking the parsed arguments and returning the exit status.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from agent import keygen, run, status
from simulator import serve as simulator

COMMANDS = (run, status, keygen, simulator)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="backhaul-agent", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for module in COMMANDS:
        module.register(sub)
    args = parser.parse_args(argv)
    status: int = args.func(args)
    return status


if __name__ == "__main__":
    sys.exit(main())
