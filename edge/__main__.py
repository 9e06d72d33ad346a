"""`backhaul-edge`: parse the command line and hand over to the command's module."""

from __future__ import annotations

import sys
from collections.abc import Sequence

from edge import serve
from edge.ops import agents, stats, tail
from edge.ops import keys as keys_cli
from shared import cli

COMMANDS = (serve, stats, tail, keys_cli, agents)


def main(argv: Sequence[str] | None = None) -> int:
    return cli.main("backhaul-edge", __doc__, COMMANDS, argv)


if __name__ == "__main__":
    sys.exit(main())
