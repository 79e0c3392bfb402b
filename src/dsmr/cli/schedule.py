"""`dsmr schedule show`: print a horizon schedule as a table (or JSON), optionally as a bar figure.

`add_schedule_arguments` / `schedule_from_args` are shared with `dsmr train`, so every command spells
the schedule options the same way.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from dsmr.errors import DsmrError

# Defaults: the paper's main setting (6 layers, two-scale, budget 2560 = 2 x 1024 + 4 x 128).
DEFAULT_SCHEDULE = "two-scale"
DEFAULT_BUDGET = 2560
DEFAULT_LONG_LAYERS = 2
DEFAULT_SHORT = 128
DEFAULT_HORIZON = 1024  # per-layer horizon of the `full` reference


def _int_list(text: str) -> list[int]:
    try:
        return [int(part) for part in text.replace(" ", "").split(",") if part != ""]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None


def add_schedule_arguments(parser: argparse.ArgumentParser) -> None:
    """The schedule options (not --layers: the caller owns the model size)."""
    from dsmr.schedule import KINDS

    group = parser.add_argument_group("schedule")
    group.add_argument("--schedule", default=DEFAULT_SCHEDULE, choices=KINDS,
                       help=f"how the budget is spread over layers (default {DEFAULT_SCHEDULE})")
    group.add_argument("--budget", type=int, default=DEFAULT_BUDGET,
                       help=f"total horizon in KV positions for uniform/two-scale/binary (default {DEFAULT_BUDGET})")
    group.add_argument("--long-layers", type=int, default=DEFAULT_LONG_LAYERS,
                       help=f"two-scale: number of lowest layers with the long horizon (default {DEFAULT_LONG_LAYERS})")
    group.add_argument("--short", type=int, default=DEFAULT_SHORT,
                       help=f"two-scale: horizon of the other layers (default {DEFAULT_SHORT})")
    group.add_argument("--horizon", type=int, default=DEFAULT_HORIZON,
                       help=f"full: horizon of every layer (default {DEFAULT_HORIZON})")
    group.add_argument("--memory-layers", type=_int_list, default=None, metavar="I,J,...",
                       help="binary: the layers (0 = lowest) that share the budget")
    group.add_argument("--horizons", type=_int_list, default=None, metavar="H0,H1,...",
                       help="explicit: one horizon per layer, lowest first")


def schedule_from_args(args: argparse.Namespace, n_layers: int):
    """The Schedule the parsed options describe (DsmrError when inconsistent)."""
    from dsmr.schedule import make_schedule

    return make_schedule(
        args.schedule,
        n_layers,
        horizon=args.horizon,
        budget=args.budget,
        long_layers=args.long_layers,
        short=args.short,
        layers=args.memory_layers,
        horizons=args.horizons,
    )


def register(subparsers) -> None:
    parser = subparsers.add_parser("schedule", help="inspect horizon schedules and their state size",
                                   description="Inspect horizon schedules and their recurrent-state size.")
    actions = parser.add_subparsers(dest="action", metavar="ACTION", required=True)
    show = actions.add_parser("show", help="print a schedule as a table (or JSON) and optionally plot it",
                              description="Print a schedule's horizons per layer, its budget and state bytes.")
    show.add_argument("--layers", type=int, default=6, help="number of layers (default 6)")
    add_schedule_arguments(show)
    show.add_argument("--d-model", type=int, default=256, help="model width, for the state size (default 256)")
    show.add_argument("--batch", type=int, default=1, help="lanes, for the state size (default 1)")
    show.add_argument("--json", action="store_true", help="print one JSON object instead of the table")
    show.add_argument("--plot", type=Path, default=None, metavar="OUT.png",
                      help="also write a bar figure (layer vs horizon); format from the extension")
    show.set_defaults(func=run_show)


def run_show(args: argparse.Namespace) -> int:
    if args.d_model < 1 or args.batch < 1:
        raise DsmrError(f"--d-model and --batch must be >= 1, got {args.d_model} and {args.batch}")
    schedule = schedule_from_args(args, args.layers)
    if args.plot is not None:
        plot_schedule(schedule, args.plot)
    if args.json:
        print(json.dumps(schedule_summary(schedule, args.d_model, args.batch)))
    else:
        print(schedule.table(d_model=args.d_model))
        if args.batch != 1:
            s = schedule_summary(schedule, args.d_model, args.batch)["state_bytes"]
            print(f"state for {args.batch} lanes: {s['fp32']} bytes fp32, {s['bf16']} bytes bf16")
        if args.plot is not None:
            print(f"figure: {args.plot}")
    return 0


def schedule_summary(schedule, d_model: int, batch: int = 1) -> dict:
    """The schedule with its state size; state_bytes assumes key/value memory and attention width d_model
    (Schedule.state_bytes), as a model built with the default head_dim and memory="kv" has."""
    return {
        **schedule.to_dict(),
        "n_layers": schedule.n_layers,
        "d_model": d_model,
        "batch": batch,
        "state_bytes": {
            "fp32": schedule.state_bytes(d_model, 4, batch),
            "bf16": schedule.state_bytes(d_model, 2, batch),
        },
    }


def plot_schedule(schedule, path: Path) -> None:
    """A bar figure of horizon per layer, written atomically."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from dsmr.atomic import atomic_path

    fmt = path.suffix.lstrip(".").lower()
    figure = plt.figure(figsize=(5.0, 3.2))
    supported = figure.canvas.get_supported_filetypes()
    if fmt not in supported:
        plt.close(figure)
        raise DsmrError(f"--plot {path}: unknown figure format {fmt!r}; use one of {', '.join(sorted(supported))}")
    try:
        ax = figure.add_subplot()
        layers = list(range(schedule.n_layers))
        ax.bar(layers, schedule.horizons, color="#3b6ea8")
        ax.set_xticks(layers)
        ax.set_xlabel("layer (0 = lowest)")
        ax.set_ylabel("horizon h_l (KV positions)")
        ax.set_title(f"{schedule.name}: budget {schedule.budget}")
        figure.tight_layout()
        with atomic_path(path) as tmp:
            figure.savefig(tmp, format=fmt, dpi=120)
    finally:
        plt.close(figure)
