"""Options defined once: a config dataclass field carries its default, its help and how the command line
spells it; dsmr.cli.common.add_options builds the argparse options from the fields.

Standard library only: command-line parsers import the configs that use it, and `dsmr --help` must stay
fast.
"""

from __future__ import annotations

import argparse
import dataclasses


def option(default, help: str, *, flag: str | None = None, negative: str | None = None,
           negative_help: str | None = None, choices: tuple | None = None, type=None, metavar: str | None = None,
           default_text: str | None = None, deprecated: tuple[str, ...] = ()):
    """A dataclass field with its command-line description.

    help           what the option does; "(default X)" is appended, X from `default_text` or the default
                   (nothing when the default is None and there is no `default_text`, or for a flag)
    flag           the spelling (default --field-name; for a boolean, the flag that turns the default
                   over: --field-name when it defaults to False, --no-field-name when True)
    negative       a boolean's second flag, setting the default value explicitly (with `negative_help`)
    type, choices, metavar   as for argparse (type: int, float or str from the field's annotation)
    deprecated     old spellings: they keep working and print a deprecation message

    A config's numeric ranges live in its class attribute BOUNDS ({field: (lowest, highest)}): the command
    line refuses values outside them with one line (exit 2), and `out_of_bounds` lists them for validate().
    """
    metadata = {"help": help, "flag": flag, "negative": negative, "negative_help": negative_help,
                "choices": choices, "type": type, "metavar": metavar, "default_text": default_text,
                "deprecated": deprecated}
    if isinstance(default, (list, dict, set)):
        raise TypeError("mutable option defaults are not supported")
    return dataclasses.field(default=default, metadata=metadata)


def bounded(kind, low, high):
    """An argparse type: a finite int or float (`kind`) in [low, high]. Refuses "1e12" for an int option
    with the range, not a traceback from an allocation later."""
    span = f"[{low}, {high}]" if kind is int else f"[{low:g}, {high:g}]"

    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {'a whole number' if kind is int else 'a number'} in "
                                             f"{span}, got {text!r}") from None
        if not (low <= value <= high):  # NaN fails too
            raise argparse.ArgumentTypeError(f"must be in {span}, got {text}")
        return value

    parse.__name__ = kind.__name__  # argparse names the type in its messages
    return parse


def wrong_types(config) -> list[str]:
    """Problems with the fields of a config dataclass in its BOUNDS that are not numbers (whole numbers where
    both bounds are): what a config.json with "lr": "abc" gives."""
    problems = []
    for name, (low, high) in getattr(config, "BOUNDS", {}).items():
        value = getattr(config, name)
        whole = isinstance(low, int) and isinstance(high, int)
        if value is not None and (isinstance(value, bool) or not isinstance(value, int if whole else (int, float))):
            problems.append(f"{name} must be a {'whole ' if whole else ''}number, got {value!r:.40}")
    return problems


def out_of_bounds(config) -> list[str]:
    """Problems with the fields of a config dataclass that lie outside its BOUNDS (fields of the wrong type are
    wrong_types' to report)."""
    problems = []
    wrong = {p.split()[0] for p in wrong_types(config)}
    for name, (low, high) in getattr(config, "BOUNDS", {}).items():
        value = getattr(config, name)
        if value is not None and name not in wrong and not low <= value <= high:  # NaN fails too
            problems.append(f"{name} must be in [{low}, {high}], got {value}")
    return problems


def int_list(text: str) -> list[int]:
    """Comma-separated integers: "0,1, 3" -> [0, 1, 3]."""
    try:
        return [int(part) for part in text.replace(" ", "").split(",") if part != ""]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None


def float_pair(text: str) -> tuple[float, float]:
    """Two comma-separated numbers: "0.9,0.95" -> (0.9, 0.95)."""
    try:
        values = tuple(float(x) for x in text.split(","))
    except ValueError:
        values = ()
    if len(values) != 2:
        raise argparse.ArgumentTypeError(f"expected two numbers like 0.9,0.95, got {text!r}")
    return values
