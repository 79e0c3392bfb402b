"""`dsmr export`: a run's model as a Hugging Face Hub-style folder (config.json, model.safetensors, README.md)."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from dsmr.cli.common import add_json, add_weights
from dsmr.errors import DsmrError


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "export", help="write a run's model as a Hub-style model folder (optionally push it)",
        description="Write OUT/config.json (model, schedule, tokenizer, segment length, figures), "
                    "OUT/model.safetensors (float32 or float16) and OUT/README.md (a model card with the "
                    "Hub's metadata header). Every command that takes a model accepts OUT.")
    p.add_argument("run", type=Path, metavar="RUN", help="a run folder (or an exported folder)")
    p.add_argument("out", type=Path, metavar="OUT", help="folder to write (new, empty, or a previous export)")
    add_weights(p)
    p.add_argument("--dtype", choices=("float32", "float16"), default="float32",
                   help="weights' precision on disk (float16: half the size; loaded back as float32)")
    p.add_argument("--eval", action="append", default=[], type=Path, metavar="FILE.json",
                   help="output of `dsmr eval --json` (its split's PPL goes into the card); repeatable")
    p.add_argument("--dataset", metavar="CORPUS",
                   help="training corpus (default: from the run's cache manifest)")
    p.add_argument("--license", metavar="ID",
                   help="Hub licence id (default: the data's; a MAESTRO model is cc-by-nc-sa-4.0)")
    p.add_argument("--name", help="model name in the card (default: the --push repo id, else OUT's name)")
    p.add_argument("--push", metavar="REPO_ID", help="then upload OUT to this Hub repo (needs network and a token)")
    p.add_argument("--private", action="store_true", help="with --push: create the repo private")
    add_json(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from dsmr.sharing.export import export_run
    from dsmr.sharing.hub import CARD_FILE, CONFIG_FILE, EXPORT_FORMAT, MODEL_FILE, is_repo_id, push_to_hub

    if args.push is not None and not is_repo_id(args.push):
        raise DsmrError(f"--push {args.push!r}: a Hub repo id is owner/name")
    if args.private and args.push is None:
        raise DsmrError("--private is only used with --push REPO_ID")
    if args.out.exists():
        if not args.out.is_dir():
            raise DsmrError(f"{args.out} exists and is not a folder")
        extra = sorted(p.name for p in args.out.iterdir() if p.name not in (CONFIG_FILE, MODEL_FILE, CARD_FILE))
        previous = _format(args.out / CONFIG_FILE)
        if extra or (any(args.out.iterdir()) and previous != EXPORT_FORMAT):
            raise DsmrError(f"{args.out} is not empty and not a previous export ({', '.join(extra[:4]) or 'other config'}): "
                            "choose another folder")
    evals = []
    for path in args.eval:
        try:
            result = json.loads(path.read_text())
        except (OSError, ValueError) as err:
            raise DsmrError(f"--eval {path}: not a readable JSON file ({err})") from err
        if not isinstance(result, dict):
            raise DsmrError(f"--eval {path}: expected the one JSON object `dsmr eval --json` prints")
        evals.append(result)
    summary = export_run(args.run, args.out, which=args.weights, dtype=args.dtype, license=args.license,
                         dataset=args.dataset, evals=evals, name=args.name or args.push)
    if summary["license"] == "other":
        print(f"dsmr export: warning: no licence for this model (its corpus {summary['dataset'] or 'is unknown'} "
              "sets none): the card says so; pass --license ID (a Hub licence identifier, e.g. mit or "
              "cc-by-4.0) that the training data allows", file=sys.stderr)
    if args.push is not None:
        summary["pushed"] = push_to_hub(args.out, args.push, private=args.private)
    if args.json:
        print(json.dumps(summary))
    else:
        print(f"wrote {args.out}: {MODEL_FILE} ({summary['dtype']}, {summary['bytes'] / 2**20:.2f} MiB, step "
              f"{summary['step']}), {CONFIG_FILE}, {CARD_FILE} (license {summary['license']})")
        if "pushed" in summary:
            print(f"pushed to {summary['pushed']}")
    return 0


def _format(config: Path):
    try:
        return json.loads(config.read_text()).get("format")
    except (OSError, ValueError, AttributeError):
        return None
