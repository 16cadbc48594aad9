"""``python -m bench [--quick] [--only read,batching,memory,scaling,gpu] [--out DIR] [--cache DIR]``

Runs the benchmark sections in this process (one local Ray for the Ray sections), prints a table and
writes ``<out>/<YYYY-MM-DD>-<hostname>[-quick].json``. Run from the repository root. See bench/README.md.

Module-level code stays light: the bare-read pool's spawned processes import this module.
"""

from __future__ import annotations

import argparse
import sys
from typing import NoReturn

from bench.run import SECTIONS


class _OneLineParser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        self.exit(2, f"python -m bench: error: {message}\n")


def _sections(text: str) -> tuple[str, ...]:
    names = tuple(dict.fromkeys(s.strip() for s in text.split(",") if s.strip()))
    unknown = [s for s in names if s not in SECTIONS]
    if unknown or not names:
        raise argparse.ArgumentTypeError(
            f"unknown section(s) {', '.join(map(repr, unknown)) or repr(text)}; choose from {','.join(SECTIONS)}"
        )
    return names


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = _OneLineParser(prog="python -m bench", description="rsflow benchmarks (see bench/README.md)")
    p.add_argument("--quick", action="store_true", help="smaller scenes and samples; under 5 minutes on 2 cores")
    p.add_argument("--only", type=_sections, default=SECTIONS, metavar="LIST",
                   help=f"comma-separated sections to run (default all: {','.join(SECTIONS)})")
    p.add_argument("--out", default="bench/results", metavar="DIR", help="results folder (default bench/results)")
    p.add_argument("--cache", metavar="DIR",
                   help="synthetic scenes cache (default $RSFLOW_CACHE/bench or ~/.cache/rsflow/bench)")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from bench.run import run_all

    return run_all(args.only, quick=args.quick, out=args.out, cache=args.cache)


if __name__ == "__main__":
    sys.exit(main())
