"""`backhaul-agent`: parse the command line and hand over to the command's module."""

from __future__ import annotations

import sys
from collections.abc import Sequence

from agent import keygen, run, service, status_cmd
from shared import cli
from simulator import serve as simulator

COMMANDS = (run, status_cmd, keygen, service, simulator)


def main(argv: Sequence[str] | None = None) -> int:
    return cli.main("backhaul-agent", __doc__, COMMANDS, argv)


if __name__ == "__main__":
    sys.exit(main())
