"""Options every command spells the same way: --weights, --device, --threads, --no-progress (and old
spellings); and `add_options`, which builds command-line options from config dataclass fields (dsmr.core.options).

Standard library only (keeps `dsmr --help` fast). An old spelling keeps working for one release and
prints a deprecation message on stderr when used.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys

from dsmr.core.options import bounded

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
    """--device, default auto (dest `device`; resolve with dsmr.core.runtime.resolve_device)."""
    parser.add_argument("--device", default="auto", help=help)


def add_json(parser, help: str = "print one JSON object on stdout", **kwargs) -> None:
    """--json (dest `json`): the command's result as one JSON object on stdout, nothing else there."""
    parser.add_argument("--json", action="store_true", help=help, **kwargs)


def add_token_cache(parser, required: bool = False, help: str = "token cache folder (from `dsmr data build`)"
                    ) -> None:
    """--cache (dest `cache`): a token cache folder, as `dsmr data build` writes it."""
    parser.add_argument("--cache", required=required, metavar="CACHE", help=help)


def add_precision(parser, choices=None, default: str | None = None, help: str | None = None) -> None:
    """--precision (dest `precision`): how decoding keeps the projection weights (dsmr.generation.defaults.PRECISIONS, and
    "auto", the default, where the command decodes)."""
    from dsmr.generation import defaults
    choices = choices or ("auto", *defaults.PRECISIONS)
    parser.add_argument("--precision", choices=choices, default=default or defaults.PRECISION, help=help or (
        "the projection weights: float16 (about 2x float32's speed on a CPU, logits within float16 rounding) "
        "or int8 with a scale per row (about 2x float16's speed on a CPU whose cache cannot hold float16's; "
        "+0.02%% validation perplexity on the shipped model). auto (default): int8 on a CPU where dsmr's "
        "kernels load (float16 where they do not), float32 elsewhere"))


def add_no_progress(parser, help: str = "no progress bar on stderr") -> None:
    """--no-progress (dest `progress`, True unless given)."""
    parser.add_argument("--no-progress", dest="progress", action="store_false", help=help)


def add_threads(parser, default: int = 0, help: str = "") -> None:
    """--threads N (dest `threads`): torch's CPU threads in this process (intra-op); 0 = as many as the machine
    has idle cores (dsmr.core.runtime.idle_threads). The default differs by command (apply with set_threads): 0 for
    train and eval; 1 for generate (one-token steps are too small to share) and for each study variant."""
    default_text = "the idle cores" if default == 0 else str(default)
    parser.add_argument("--threads", type=bounded(int, 0, 1024), default=default, metavar="N",
                        help=f"CPU threads for torch, 0 = one per idle core (default {default_text}{help})")


def set_threads(threads: int | None, say: str | None = None) -> int:
    """Apply --threads: N >= 1 sets torch's CPU threads; 0 or None one per core no other work keeps busy (each
    process of a torchrun launch its share). `say`: the command's name, to print what was chosen."""
    import os

    from dsmr.errors import DsmrError

    if threads is not None and threads < 0:
        raise DsmrError(f"--threads must be >= 0 (0: one per idle core), got {threads}")
    import torch

    if not threads:
        from dsmr.core.runtime import idle_threads, usable_cores

        threads, busy = idle_threads(int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
        if say:
            print(f"{say}: {threads} CPU thread{'s' if threads > 1 else ''} ({usable_cores()} cores, "
                  f"{busy:.1f} kept busy by other work; --threads N to choose)", file=sys.stderr, flush=True)
    torch.set_num_threads(threads)
    return threads


def add_options(parser, config_cls, names, given_only: bool = False) -> None:
    """Add the options of the dataclass `config_cls` named `names` (fields made with dsmr.core.options.option),
    each into the dest of its field's name.

    `given_only`: every option defaults to None, so that the caller can tell the options given from the
    others (`dsmr train --resume` changes only those); the help still shows the field's default."""
    fields = {f.name: f for f in dataclasses.fields(config_cls)}
    for name in names:
        field = fields[name]
        meta = field.metadata
        default = None if given_only else field.default
        if field.type in ("bool", bool):
            flag = meta["flag"] or ("--no-" if field.default else "--") + name.replace("_", "-")
            parser.add_argument(flag, dest=name, action="store_const", const=not field.default, default=default,
                                help=meta["help"])
            if meta["negative"]:
                parser.add_argument(meta["negative"], dest=name, action="store_const", const=field.default,
                                    default=default, help=meta["negative_help"])
            continue
        flag = meta["flag"] or "--" + name.replace("_", "-")
        kwargs = {"type": meta["type"] or _field_type(field)}
        if name in getattr(config_cls, "BOUNDS", {}):
            kwargs["type"] = bounded(kwargs["type"], *config_cls.BOUNDS[name])
        if meta["choices"]:
            kwargs["choices"] = meta["choices"]
        if meta["metavar"]:
            kwargs["metavar"] = meta["metavar"]
        parser.add_argument(flag, dest=name, default=default, help=_help(field), **kwargs)
        for old in meta["deprecated"]:
            parser.add_argument(old, dest=name, action=DeprecatedAlias, new=flag, **kwargs)


def _field_type(field) -> type:
    """int, float, str or bool from a field's annotation ("int | None" -> int); others need option(type=)."""
    annotation = field.type if isinstance(field.type, str) else getattr(field.type, "__name__", "")
    base = annotation.split("|")[0].strip()
    types = {"int": int, "float": float, "str": str, "bool": bool}
    if base not in types:
        raise TypeError(f"option {field.name}: give option(type=...) for a {annotation} field")
    return types[base]


def _help(field) -> str:
    text, shown = field.metadata["default_text"], field.default
    if text is None and shown is not None:
        text = str(shown)
    return f"{field.metadata['help']} (default {text})" if text else field.metadata["help"]
