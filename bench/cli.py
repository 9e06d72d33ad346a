"""The command line the benchmarks share: `--rounds`, `--json` and, where a run is counted in
requests, `--requests`.

Every benchmark repeats its measurement `--rounds` times (alternating the things it compares, so
that one noisy moment of this shared machine does not decide the result) and prints its figures
as text, or as JSON too with `--json`; `make bench` and docs/performance.md call them all the same
way. A benchmark adds its own options to the parser it gets here.
"""

from __future__ import annotations

import argparse


def parser(
    description: str | None,
    *,
    rounds: int = 3,
    requests: int | None = None,
    requests_help: str | None = None,
) -> argparse.ArgumentParser:
    """A benchmark's parser with `--requests` (when `requests` is its default), `--rounds` and
    `--json`."""
    made = argparse.ArgumentParser(description=description)
    if requests is not None:
        made.add_argument("--requests", type=int, default=requests, help=requests_help)
    made.add_argument("--rounds", type=int, default=rounds)
    made.add_argument("--json", action="store_true", help="print the figures as JSON")
    return made
