"""The `dsmr` command: one thin layer that wires subcommands to the library.

Each subcommand lives in its own module in this package and exposes `register(subparsers)`, which adds
its parser and sets `func` (a callable taking the parsed args and returning an exit code). Heavy imports
(torch, symusic, ...) happen inside those functions so that `dsmr --help` stays fast.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from dsmr.errors import DsmrError

# Subcommand modules, in the order `dsmr --help` lists them.
SUBCOMMANDS = ["data", "schedule", "train", "eval", "generate", "live", "study", "export", "metrics", "app"]


class OneLineErrors(argparse.ArgumentParser):
    """Usage errors (a bad value, a missing option) in one line that names the option, exit status 2; the
    subcommands' parsers are of this class too."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    from dsmr import __version__
    parser = OneLineErrors(
        prog="dsmr",
        description="Depth-Structured Music Recurrence: full-piece symbolic music modeling.",
    )
    parser.add_argument("--version", action="version", version=f"dsmr {__version__}")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in SUBCOMMANDS:
        importlib.import_module(f"dsmr.cli.{name}").register(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as stop:  # --help, --version, or a usage error (already printed): its status
        return int(stop.code or 0)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        return int(args.func(args) or 0)
    except DsmrError as err:
        print(f"dsmr {args.command}: error: {err}", file=sys.stderr)
        return 2
    except OSError as err:  # a full disk, a permission problem: say what and where, no traceback
        print(f"dsmr {args.command}: error: {err}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"dsmr {args.command}: interrupted", file=sys.stderr)
        return 130
