"""`dsmr study`: the schedule study (dsmr.study) — train the variants, write tables and figures.

    dsmr study --cache DIR --out STUDY [--variants a,b,...] [--steps N] [--budget B] [--seed S] [--json]
    dsmr study merge OUT STUDY1 STUDY2 ...

Every variant trains with the same model size, data order, seed and steps, in its own process; a
finished variant is not trained again, an interrupted one resumes. `--variants NAME` runs some variants
alone (spread a study over processes or machines), `dsmr study merge` puts their results together.
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys

from dsmr.cli.common import add_device, add_no_progress


def register(subparsers) -> None:
    from dsmr.study import StudyConfig

    d = StudyConfig()
    p = subparsers.add_parser(
        "study", help="train memory-schedule variants side by side; tables and figures",
        description="The schedule study: train every variant (full, uniform, two-scale, its inverse, two "
                    "binary placements, none, soft and straight-through gates, the excerpt baseline) with the "
                    "same model, data order, seed and steps; evaluate over full validation pieces; write "
                    "results.csv, results.md and figures into --out. `dsmr study merge OUT DIR...` merges "
                    "studies run apart (other variants or seeds).",
        epilog="merge studies: dsmr study merge OUT DIR1 [DIR2 ...]")
    p.add_argument("--cache", help="token cache folder (from `dsmr data build`)")
    p.add_argument("--out", help="study folder (created, or continued: finished variants are reused)")
    p.add_argument("--variants", type=_names, help="comma-separated variants to run (default all; --list shows them)")
    p.add_argument("--list", action="store_true", help="print the variants and their horizons, train nothing")
    p.add_argument("--json", action="store_true", help="print the result rows as one JSON object on stdout")
    add_no_progress(p, help="no progress output")
    p.add_argument("--in-process", action="store_true",
                   help="train every variant in this process (faster start; peak-memory figures then "
                        "inherit earlier variants' memory)")
    m = p.add_argument_group("shared model and training options")
    m.add_argument("--layers", type=int, default=d.layers, help=f"decoder blocks (default {d.layers})")
    m.add_argument("--d-model", type=int, default=d.d_model, help=f"model width (default {d.d_model})")
    m.add_argument("--heads", type=int, default=d.heads, help=f"attention heads (default {d.heads})")
    m.add_argument("--head-dim", type=int, default=d.head_dim, help="width of each head (default d-model / heads)")
    m.add_argument("--no-tie-embeddings", dest="tie_embeddings", action="store_false",
                   help="separate output head instead of the tied embedding")
    m.add_argument("--memory", choices=("kv", "hidden"), default=d.memory,
                   help=f"what the memory holds in training (default {d.memory}; see dsmr train --help)")
    m.add_argument("--curriculum", type=float, default=d.curriculum,
                   help=f"the *-curriculum variants grow their horizons over this fraction of the steps "
                        f"(default {d.curriculum})")
    m.add_argument("--test", action="store_true",
                   help="also evaluate every final model over the whole validation and test splits (in the tables)")
    m.add_argument("--segment", type=int, default=d.segment, help=f"tokens per segment (default {d.segment})")
    m.add_argument("--batch-size", type=int, default=d.batch_size, help=f"lanes (default {d.batch_size})")
    m.add_argument("--horizon", type=int, default=d.horizon,
                   help=f"every layer's horizon in `full` and the gated variants (default {d.horizon})")
    m.add_argument("--budget", type=int, default=d.budget,
                   help=f"KV positions of the budgeted variants (default {d.budget})")
    m.add_argument("--long-layers", type=int, default=d.long_layers,
                   help=f"two-scale: layers with the long horizon (default {d.long_layers})")
    m.add_argument("--short", type=int, default=d.short, help=f"two-scale: the short horizon (default {d.short})")
    m.add_argument("--context", type=int, default=d.context,
                   help="excerpt baseline length (default: --horizon)")
    m.add_argument("--gate-init", type=float, default=d.gate_init, help=f"initial gate logit (default {d.gate_init})")
    m.add_argument("--gate-lambda", type=float, default=d.gate_lambda,
                   help=f"gate budget penalty weight (default {d.gate_lambda})")
    m.add_argument("--steps", type=int, default=d.steps, help=f"optimizer steps per variant (default {d.steps})")
    m.add_argument("--lr", type=float, default=d.lr, help=f"peak learning rate (default {d.lr})")
    m.add_argument("--eval-every", type=int, default=d.eval_every,
                   help=f"steps between validations, for the curves (default {d.eval_every})")
    m.add_argument("--val-pieces", type=int, default=d.val_pieces,
                   help=f"validate on the first N validation pieces, each in full (default {d.val_pieces}; "
                        "0 = all)")
    m.add_argument("--eval-batch-size", type=int, default=d.eval_batch_size, help="lanes for validation")
    m.add_argument("--seed", type=int, default=d.seed,
                   help=f"seed for initialization and data order (default {d.seed})")
    add_device(m)
    m.add_argument("--threads", type=int, default=d.threads,
                   help=f"torch CPU threads per variant (default {d.threads})")
    p.set_defaults(func=run)

    # `dsmr study merge OUT DIR...`: a positional first word, so the study options stay at top level
    p.add_argument("merge_args", nargs="*", metavar="merge OUT DIR", help=argparse.SUPPRESS)


def _names(text: str) -> list[str]:
    return [n.strip() for n in text.split(",") if n.strip()]


def _config(args):
    from dsmr.study import StudyConfig

    return StudyConfig(layers=args.layers, d_model=args.d_model, heads=args.heads, head_dim=args.head_dim,
                       tie_embeddings=args.tie_embeddings, memory=args.memory, curriculum=args.curriculum,
                       test=args.test, segment=args.segment,
                       batch_size=args.batch_size, horizon=args.horizon, budget=args.budget,
                       long_layers=args.long_layers, short=args.short, context=args.context,
                       gate_init=args.gate_init, gate_lambda=args.gate_lambda, steps=args.steps, lr=args.lr,
                       eval_every=args.eval_every, val_pieces=args.val_pieces or None,
                       eval_batch_size=args.eval_batch_size, seed=args.seed, device=args.device,
                       threads=args.threads)


def run(args: argparse.Namespace) -> int:
    from dsmr.errors import DsmrError
    from dsmr import study

    command = "dsmr study " + " ".join(shlex.quote(a) for a in sys.argv[2:]) if sys.argv[1:2] == ["study"] else None
    if args.merge_args:
        if args.merge_args[0] != "merge" or len(args.merge_args) < 3:
            raise DsmrError(f"unexpected arguments {args.merge_args}: use `dsmr study merge OUT DIR1 [DIR2 ...]`")
        out, dirs = args.merge_args[1], args.merge_args[2:]
        records = study.merge_studies(out, dirs, command=command)
        return _print(args, study.summarize(records), out)
    cfg = _config(args)
    cfg.validate()
    if args.list:
        from dsmr.train import make_run_schedule

        for v in study.select_variants(cfg, args.variants):
            train_cfg = study.train_config(cfg, v)
            horizons = ",".join(map(str, make_run_schedule(train_cfg).horizons))
            print(f"{v.name:<18} {horizons:<24} {v.description}")
        return 0
    if not args.cache or not args.out:
        raise DsmrError("give --cache and --out (or `dsmr study merge OUT DIR...`)")
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    study.run_study(args.cache, args.out, cfg, variants=args.variants, fresh_process=not args.in_process,
                    progress=args.progress, command=command)
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
