"""`dsmr metrics`: do generated pieces look like the data? Music statistics of sets of pieces, compared."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from dsmr.cli.common import add_json, add_no_progress
from dsmr.errors import DsmrError


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "metrics", help="music statistics of generated pieces vs a reference split (OA, KL, figure)",
        description="Per piece: pitch-class entropy, pitch range, distinct pitches, polyphony, note density, "
                    "inter-onset interval, velocity, and pitch-class / IOI / duration / velocity histograms. "
                    "Per set: their distributions, and for each generated set the overlapping area (OA) and "
                    "KL divergence against the reference set (Yang & Lerch 2020). Each GENERATED folder or "
                    "cache is one set; MIDI files given one by one form the set 'generated'.")
    p.add_argument("generated", nargs="+", type=Path, metavar="GENERATED",
                   help="MIDI files, folders of MIDI files, or a token cache (its --generated-split)")
    p.add_argument("--reference", required=True, type=Path, metavar="CACHE", help="token cache of the real music")
    p.add_argument("--split", default="test", help="reference split (default test)")
    p.add_argument("--generated-split", default="train",
                   help="split of a GENERATED token cache (default train: the yardstick train vs test)")
    p.add_argument("--max-pieces", type=int, metavar="N",
                   help="at most N pieces of each cache split (a random sample, fixed by --seed)")
    p.add_argument("--crop-seconds", type=float, metavar="S",
                   help="only the notes that start in the first S seconds of every piece (compare pieces of "
                        "similar length: reference pieces are often much longer than generated ones)")
    p.add_argument("--seed", type=int, default=0, help="seed of the --max-pieces sample (default 0)")
    p.add_argument("--plot", type=Path, metavar="OUT.png", help="draw the distributions side by side")
    add_json(p, help="print one JSON object (sets, distances, pieces)")
    add_no_progress(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from dsmr.data.cache import TokenCache
    from dsmr.evaluation.music_stats import (default_set_name, features_of_cache, features_of_files, format_report,
                              metrics_report, midi_files, plot_report)

    if args.max_pieces is not None and args.max_pieces < 1:
        raise DsmrError(f"--max-pieces must be >= 1, got {args.max_pieces}")
    if args.crop_seconds is not None and not args.crop_seconds > 0:
        raise DsmrError(f"--crop-seconds must be > 0, got {args.crop_seconds}")
    common = dict(crop_seconds=args.crop_seconds)
    sets: dict[str, list[dict]] = {}
    skipped: list[dict] = []
    loose: list[Path] = []
    for path in args.generated:
        if path.is_dir() and (path / "manifest.json").is_file():
            cache = TokenCache(path)
            name = _unique(f"{default_set_name(path)}:{args.generated_split}", sets)
            sets[name], bad = features_of_cache(cache, args.generated_split, args.max_pieces, seed=args.seed,
                                                progress=args.progress, **common)
        elif path.is_dir():
            name = _unique(default_set_name(path), sets)
            sets[name], bad = features_of_files(midi_files([path]), **common)
        else:
            loose += midi_files([path])
            continue
        skipped += bad
    if loose:
        name = _unique("generated", sets)
        sets[name], bad = features_of_files(loose, **common)
        skipped += bad
    reference = TokenCache(args.reference)
    ref_name = _unique(f"{default_set_name(args.reference)}:{args.split}", sets)
    sets[ref_name], bad = features_of_cache(reference, args.split, args.max_pieces, seed=args.seed,
                                            progress=args.progress, **common)
    skipped += bad
    for name, pieces in sets.items():
        if not pieces:
            reasons = "; ".join(f"{s['path']}: {s['reason']}" for s in skipped[:3])
            raise DsmrError(f"set {name!r} has no piece with notes" + (f" ({reasons})" if reasons else ""))
    for s in skipped:
        print(f"dsmr metrics: skipped {s['path']}: {s['reason']}", file=sys.stderr)
    for warning in set_warnings(sets, args.crop_seconds):
        print(f"dsmr metrics: warning: {warning}", file=sys.stderr)

    report = metrics_report(sets, ref_name)
    if args.plot is not None:
        report["plot"] = str(plot_report(report, sets, args.plot))
    if args.json:
        print(json.dumps({**report, "skipped": skipped, "crop_seconds": args.crop_seconds,
                          "pieces": {n: [{k: v for k, v in p.items()} for p in ps] for n, ps in sets.items()}}))
    else:
        print(format_report(report))
        if args.plot is not None:
            print(f"\nfigure: {args.plot}")
    return 0


SMALL_SET = 20  # pieces: below this an overlap figure moves a lot with one piece more or less


def set_warnings(sets: dict[str, list[dict]], crop_seconds: float | None) -> list[str]:
    """What makes the comparison shaky: small sets, and sets of very different lengths compared uncropped
    (range, distinct pitches and the like grow with a piece's length)."""
    warnings = [f"set {name!r} has only {len(pieces)} piece(s): its overlaps are rough (use {SMALL_SET} or more)"
                for name, pieces in sets.items() if 0 < len(pieces) < SMALL_SET]
    if crop_seconds is None:
        lengths = {name: sorted(p["seconds"] for p in pieces)[len(pieces) // 2] for name, pieces in sets.items()
                   if pieces}
        if lengths and max(lengths.values()) > 2 * max(min(lengths.values()), 1e-9):
            spans = ", ".join(f"{name} {seconds:.0f} s" for name, seconds in lengths.items())
            warnings.append(f"the sets' pieces differ in length (median {spans}): give --crop-seconds S to "
                            "compare the first S seconds of each")
    return warnings


def _unique(name: str, taken: dict) -> str:
    out, i = name, 2
    while out in taken:
        out, i = f"{name} ({i})", i + 1
    return out
