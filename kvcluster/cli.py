"""The ``kvcluster`` command line. Each subcommand lives in ``kvcluster/commands/<name>.py``
and exposes ``register(subparsers)`` (adds its parser and sets ``handler``).

Handlers import what they run (Ray, torch, the node engine) when they are called, not when
the parser is built, so ``kvcluster --help`` and a mistyped command answer at once.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys
from collections.abc import Sequence

from kvcluster.errors import KVClusterError

#: Subcommand modules, in the order ``--help`` lists them.
COMMANDS = ("plan", "analyze", "simulate", "demo", "up", "down", "status")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="kvcluster", description="A distributed, tiered KV-cache cluster for LLM inference."
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="log at DEBUG level")
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name in COMMANDS:
        try:
            module = importlib.import_module(f"kvcluster.commands.{name}")
        except ModuleNotFoundError as exc:
            if exc.name != f"kvcluster.commands.{name}":
                raise
            continue
        module.register(subparsers)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.WARNING,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    try:
        return int(args.handler(args) or 0)
    except KVClusterError as exc:
        print(f"kvcluster {args.command}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
