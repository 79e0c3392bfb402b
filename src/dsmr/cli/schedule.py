"""`dsmr schedule show`: print a horizon schedule as a table (or JSON), optionally as a bar figure.

Its schedule options, and their defaults (the paper's main setting: 6 layers, two-scale, budget
2560 = 2 x 1024 + 4 x 128), are dsmr train's: both are built from dsmr.training.config.TrainConfig.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from dsmr.cli.common import add_json
from dsmr.errors import DsmrError


def schedule_from_args(args: argparse.Namespace, n_layers: int):
    """The Schedule the parsed options describe (DsmrError when inconsistent)."""
    from dsmr.model.schedule import make_schedule

    return make_schedule(
        args.schedule,
        n_layers,
        horizon=args.horizon,
        budget=args.budget,
        long_layers=args.long_layers,
        short=args.short,
        layers=args.binary_layers,
        horizons=args.horizons,
    )


def register(subparsers) -> None:
    from dsmr.cli.common import add_options
    from dsmr.training.config import SCHEDULE_OPTIONS, TrainConfig

    parser = subparsers.add_parser("schedule", help="inspect horizon schedules and their state size",
                                   description="Inspect horizon schedules and their recurrent-state size.")
    actions = parser.add_subparsers(dest="action", metavar="ACTION", required=True)
    show = actions.add_parser("show", help="print a schedule as a table (or JSON) and optionally plot it",
                              description="Print a schedule's horizons per layer, its budget and state bytes.")
    add_options(show, TrainConfig, ("layers", "d_model"))
    add_options(show.add_argument_group("schedule"), TrainConfig, SCHEDULE_OPTIONS)
    show.add_argument("--batch", type=int, default=1, help="lanes, for the state size (default 1)")
    add_json(show, help="print one JSON object instead of the table")
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

    from dsmr.core.atomic import atomic_path

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
