"""`dsmr study`: the schedule study (dsmr.study) — train the variants, write tables and figures.

    dsmr study --cache DIR --out STUDY [--variants a,b,...] [--steps N] [--budget B] [--seed S] [--json]
    dsmr study merge OUT STUDY1 STUDY2 ...
    dsmr study status STUDY1 [STUDY2 ...]

Every variant trains with the same model size, data order, seed and steps, in its own process; a
finished variant is not trained again, an interrupted one resumes. `--variants NAME` runs some variants
alone (spread a study over processes or machines), `dsmr study merge` puts their results together, and
`dsmr study status` says where each started variant stands while they run.
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys

from dsmr.cli.common import add_device, add_json, add_no_progress, add_options, add_threads, add_token_cache


def register(subparsers) -> None:
    from dsmr.study import PRESETS, SHARED_OPTIONS, StudyConfig

    p = subparsers.add_parser(
        "study", help="train memory-schedule variants side by side; tables and figures",
        description="The schedule study: train every variant (full, uniform, two-scale, its inverse, two "
                    "binary placements, none, soft and straight-through gates, the excerpt baseline) with the "
                    "same model, data order, seed and steps; evaluate over full validation pieces; write "
                    "results.csv, results.md and figures into --out. `dsmr study merge OUT DIR...` merges "
                    "studies run apart (other variants or seeds).",
        epilog="merge studies: dsmr study merge OUT DIR1 [DIR2 ...]; where running or stopped studies stand: "
               "dsmr study status DIR1 [DIR2 ...]")
    add_token_cache(p)
    p.add_argument("--out", help="study folder (created, or continued: finished variants are reused)")
    p.add_argument("--variants", type=_names, help="comma-separated variants to run (default all; --list shows them)")
    p.add_argument("--list", action="store_true", help="print the variants and their horizons, train nothing")
    add_json(p, help="print the result rows as one JSON object on stdout")
    add_no_progress(p, help="no progress output")
    p.add_argument("--in-process", action="store_true",
                   help="train every variant in this process (faster start; peak-memory figures then "
                        "inherit earlier variants' memory)")
    m = p.add_argument_group("shared model and training options")
    m.add_argument("--preset", choices=sorted(PRESETS),
                   help="start from a named set of options (first-study: the first study's old recipe, tied head, "
                        "init std 0.02, kv memory, 800 steps); options given here override it")
    add_options(m, StudyConfig, SHARED_OPTIONS, given_only=True)
    add_device(m)
    add_threads(m, default=StudyConfig.threads, help=", per variant")
    p.set_defaults(func=run)

    actions = p.add_subparsers(dest="action", metavar="ACTION")
    merge = actions.add_parser("merge", help="merge studies run apart (other variants or seeds) into OUT",
                               description="Merge the finished variants of several study folders into OUT: "
                                           "results, tables and figures.")
    merge.add_argument("out", metavar="OUT", help="the merged study folder")
    merge.add_argument("dirs", nargs="*", metavar="DIR", help="study folders to merge (one or more)")
    add_token_cache(merge, help="the token cache the studies were evaluated on: results without per-note "
                                "figures get them (notes counted from its validation and test splits)")
    add_json(merge, help="print the result rows as one JSON object on stdout", default=argparse.SUPPRESS)
    merge.set_defaults(func=run_merge)
    status = actions.add_parser("status", help="where each started variant stands: step, validation PPL so far, "
                                               "speed, time left",
                                description="Where each started variant of the study folders stands: finished, "
                                            "or unfinished with its last step, validation PPL so far, training "
                                            "speed and training time left (validations not counted), and "
                                            "whether a checkpoint exists to resume from.")
    status.add_argument("dirs", nargs="+", metavar="DIR", help="study folders")
    add_json(status, help="print the rows as one JSON object on stdout", default=argparse.SUPPRESS)
    status.set_defaults(func=run_status)


def _names(text: str) -> list[str]:
    return [n.strip() for n in text.split(",") if n.strip()]


def _config(args):
    """StudyConfig from the defaults, then --preset, then the options given on the command line."""
    from dsmr.study import PRESETS, SHARED_OPTIONS, StudyConfig

    given = {name: getattr(args, name) for name in SHARED_OPTIONS if getattr(args, name) is not None}
    if "val_pieces" in given:
        given["val_pieces"] = given["val_pieces"] or None  # 0 on the command line: all validation pieces
    options = {**PRESETS.get(args.preset, {}), **given}
    # threads 0: torch's own thread count
    return StudyConfig(**options, device=args.device, threads=args.threads or None)


def _command() -> str | None:
    """The command line as typed, for study.json and the tables."""
    return "dsmr study " + " ".join(shlex.quote(a) for a in sys.argv[2:]) if sys.argv[1:2] == ["study"] else None


def run_merge(args: argparse.Namespace) -> int:
    from dsmr import study
    from dsmr.errors import DsmrError

    if not args.dirs:
        raise DsmrError("use `dsmr study merge OUT DIR1 [DIR2 ...]`: give at least one study folder to merge")
    cache = None
    if args.cache:
        from dsmr.data.cache import TokenCache

        cache = TokenCache(args.cache)
    records = study.merge_studies(args.out, args.dirs, command=_command(), cache=cache)
    return _print(args, study.summarize(records), args.out)


def run_status(args: argparse.Namespace) -> int:
    from dsmr import study
    rows = study.study_status(args.dirs)
    if getattr(args, "json", False):
        print(json.dumps({"status": rows}))
        return 0
    if not rows:
        print(f"no variant started yet in {', '.join(args.dirs)}")
        return 0
    print(f"{'variant':<22} {'seed':>4} {'state':<10} {'step':>15} {'val PPL':>8} {'at step':>7} {'test PPL':>8} "
          f"{'tok/s':>6} {'hours left':>10}")
    for r in rows:
        curve = r["val_curve"]
        print(f"{r['variant']:<22} {r['seed']:>4} {r['state']:<10} {r['step']:>7,}/{_number(r['steps'], ','):<7} "
              f"{_number(r['val_ppl'], '.2f'):>8} {_number(curve[-1]['step'] if curve else None, ','):>7} "
              f"{_number(r['test_ppl'], '.2f'):>8} {_number(r['train_tokens_per_s'], '.0f'):>6} "
              f"{_number(r['hours_left'], '.1f'):>10}" + ("" if r.get("resumable", True) else "  (no checkpoint yet)"))
    _print_curves(rows)
    return 0


def _print_curves(rows: list[dict]) -> None:
    """Validation PPL by step, one column per variant and seed: where the variants cross, so far."""
    curves = {f"{r['variant']}/{r['seed']}": {p["step"]: p["val_ppl"] for p in r["val_curve"]} for r in rows}
    curves = {name: curve for name, curve in curves.items() if curve}
    if not curves:
        return
    width = max(9, *(len(name) for name in curves))
    print("\nvalidation PPL by step (the pieces validated during training)")
    print(f"{'step':>7} " + " ".join(f"{name:>{width}}" for name in curves))
    for step in sorted({step for curve in curves.values() for step in curve}):
        print(f"{step:>7,} " + " ".join(f"{_number(curve.get(step), '.2f'):>{width}}" for curve in curves.values()))


def _number(value, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def run(args: argparse.Namespace) -> int:
    from dsmr.cli.common import set_threads
    from dsmr.errors import DsmrError
    from dsmr import study
    cfg = _config(args)
    cfg.validate()
    if args.list:
        from dsmr.training.config import make_run_schedule

        rows = [(v, ",".join(map(str, make_run_schedule(study.train_config(cfg, v)).horizons)))
                for v in study.select_variants(cfg, args.variants)]
        name_width, horizon_width = (max(len(x) for x in column) + 2 for column in zip(*[(v.name, h) for v, h in rows]))
        for v, horizons in rows:  # columns as wide as their longest entry
            print(f"{v.name:<{name_width}}{horizons:<{horizon_width}}{v.description}")
        return 0
    if not args.cache or not args.out:
        raise DsmrError("give --cache and --out (or `dsmr study merge OUT DIR...`, `dsmr study status DIR...`)")
    set_threads(cfg.threads)
    study.run_study(args.cache, args.out, cfg, variants=args.variants, fresh_process=not args.in_process,
                    progress=args.progress, command=_command())
    # the table covers every variant finished in the folder, not only those of this call
    return _print(args, study.summarize(study.collect_results([args.out])), args.out)


def _print(args, rows: list[dict], out) -> int:
    if args.json:
        print(json.dumps({"study": str(out), "results": rows}))
    else:
        for row in rows:
            ppl = f"{row['val_ppl']:.3f}" if row["val_ppl"] is not None else "-"
            print(f"{row['variant']:<18} val ppl {ppl:>8}  {row['train_tokens_per_s'] or 0:>7.0f} tok/s  "
                  f"state {row['state_bytes'] / 1024:>6.0f} KiB")
        print(f"tables and figures: {out}/results.md, {out}/results.csv, {out}/figures/")
    return 0
