"""Options every command spells the same way: --weights, --device, --no-progress (and old spellings).

Standard library only (keeps `dsmr --help` fast). An old spelling keeps working for one release and
prints a deprecation message on stderr when used.
"""

from __future__ import annotations

import argparse
import sys

WEIGHTS = ("best", "latest")


class DeprecatedAlias(argparse.Action):
    """An old spelling of an option: stores into the new option's dest and says which spelling to use."""

    def __init__(self, option_strings, dest, new: str, **kwargs):
        self.new = new
        kwargs.setdefault("help", argparse.SUPPRESS)
        super().__init__(option_strings, dest, **kwargs)

    def __call__(self, parser, namespace, values, option_string=None):
        print(f"{parser.prog}: warning: {option_string} is deprecated and will be removed in the next "
              f"release; use {self.new}", file=sys.stderr)
        setattr(namespace, self.dest, values)


def add_weights(parser, help: str = "which weights of a run folder: best validation (default; the latest "
                                    "when the run has no best) or latest") -> None:
    """--weights best|latest (dest `weights`); --which is its deprecated spelling."""
    parser.add_argument("--weights", choices=WEIGHTS, default="best", help=help)
    parser.add_argument("--which", dest="weights", choices=WEIGHTS, action=DeprecatedAlias, new="--weights")


def add_device(parser, help: str = "auto (cuda if available, else cpu), cpu, cuda, cuda:1, ... (default auto)"
               ) -> None:
    """--device, default auto (dest `device`; resolve with dsmr.runtime.resolve_device)."""
    parser.add_argument("--device", default="auto", help=help)


def add_no_progress(parser, help: str = "no progress bar on stderr") -> None:
    """--no-progress (dest `progress`, True unless given)."""
    parser.add_argument("--no-progress", dest="progress", action="store_false", help=help)
