"""`dsmr train`: train a DSMR model on a token cache into a run folder (see docs/training.md).

Every option is a field of dsmr.training.config.TrainConfig, with its default and help, so
`dsmr train --cache DIR --out RUN` alone trains a small two-scale model. With --resume the run's saved
config is the base and only the options given on the command line change it (dsmr.training.resume refuses
changes that would alter what the model computes).

`--nproc N` re-launches the same command through torch.distributed.run (torchrun) with N processes
per node (DistributedDataParallel, see docs/distributed.md); `torchrun ... -m dsmr train ...` works too.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

from dsmr.cli.common import add_json, add_no_progress, add_options, add_threads, add_token_cache, set_threads
from dsmr.core.options import bounded

# Options of the launcher itself: not passed on to the processes it starts.
_LAUNCH_OPTIONS = ("nproc", "nnodes", "node_rank", "master_addr", "master_port")
_PARSER: argparse.ArgumentParser | None = None  # the train parser, to rebuild a command line from args


def register(subparsers) -> None:
    from dsmr.training import config as T
    p = subparsers.add_parser(
        "train", help="train a DSMR model (full-piece streaming) into a run folder",
        description="Train a DSMR model on the train split of a token cache, streaming whole pieces "
                    "segment by segment. Writes config.json, weights (safetensors), a resumable trainer "
                    "state and metrics.jsonl into --out. Ctrl-C saves a resumable checkpoint.")
    add_token_cache(p, required=True)
    p.add_argument("--out", required=True, help="run folder to create (or to continue with --resume)")
    p.add_argument("--resume", action="store_true", help="continue the run in --out from its latest checkpoint")
    add_json(p, help="print one JSON object (final validation metrics plus steps) on stdout")
    add_no_progress(p)
    # Every TrainConfig option defaults to None here ("not given"), so --resume can tell explicit options
    # from defaults; the defaults themselves come from TrainConfig.
    groups = [("schedule", T.SCHEDULE_OPTIONS), ("model", T.MODEL_OPTIONS), ("learned gates", T.GATE_OPTIONS),
              ("data", T.DATA_OPTIONS), ("augmentation", T.AUGMENT_OPTIONS), ("optimization", T.OPTIMIZATION_OPTIONS),
              ("evaluation and logging", T.EVALUATION_OPTIONS), ("runtime", T.RUNTIME_OPTIONS),
              ("fine-tuning", T.FINE_TUNING_OPTIONS)]
    for title, names in groups:
        group = p.add_argument_group(title)
        add_options(group, T.TrainConfig, names, given_only=True)
        if title == "optimization":
            add_options(group.add_mutually_exclusive_group(), T.TrainConfig, T.LENGTH_OPTIONS, given_only=True)
        if title == "runtime":
            add_threads(group, help="; 1 is fastest for small models on a busy machine")

    n = p.add_argument_group("several processes (DistributedDataParallel; see docs/distributed.md)")
    n.add_argument("--nproc", type=bounded(int, 1, 1024), help="start N training processes on this machine through torchrun "
                   "(one per GPU; gloo on CPU); resume with the same total")
    n.add_argument("--nnodes", help="with --nproc: number of machines (each runs the same command)")
    n.add_argument("--node-rank", type=bounded(int, 0, 65535), help="with --nnodes: this machine's index, 0 .. nnodes-1")
    n.add_argument("--master-addr", help="with --nnodes: address of the node-rank 0 machine")
    n.add_argument("--master-port", type=bounded(int, 1, 65535), help="with --nnodes: its port (default 29500)")
    p.set_defaults(func=run)
    global _PARSER
    _PARSER = p


def _explicit_options(args: argparse.Namespace) -> dict:
    """The TrainConfig options given on the command line."""
    import dataclasses

    from dsmr.training.config import TrainConfig

    given = {f.name: getattr(args, f.name) for f in dataclasses.fields(TrainConfig)
             if getattr(args, f.name, None) is not None}
    if "horizons" in given:
        given["horizons"] = tuple(given["horizons"])
        given.setdefault("schedule", "explicit")
    if "binary_layers" in given:
        given["binary_layers"] = tuple(given["binary_layers"])
        given.setdefault("schedule", "binary")
    return given


def _check_values(args: argparse.Namespace) -> None:
    """DsmrError (exit 2) for values argparse lets through: NaN and infinities, a negative seed, an --out
    that is a file or cannot be written."""
    import dataclasses
    import math

    from dsmr.errors import DsmrError
    from dsmr.core.files import check_output_folder

    from dsmr.training.config import TrainConfig

    floats = [f.name for f in dataclasses.fields(TrainConfig) if f.type == "float"]
    for name in floats:
        value = getattr(args, name, None)
        if value is not None and not math.isfinite(value):
            raise DsmrError(f"--{name.replace('_', '-')} must be a finite number, got {value}")
    if args.betas is not None and not all(math.isfinite(b) for b in args.betas):
        raise DsmrError(f"--betas must be finite numbers, got {args.betas}")
    if args.seed is not None and not 0 <= args.seed < 2**63:
        raise DsmrError(f"--seed must be a whole number >= 0, got {args.seed}")
    check_output_folder(args.out, "--out")


def relaunch_argv(args: argparse.Namespace, parser: argparse.ArgumentParser | None = None) -> list[str]:
    """`train ...` options that reproduce `args`, without the launcher's own options."""
    parser = parser or _PARSER
    argv, seen = ["train"], set()
    for action in parser._actions:
        if not action.option_strings or action.dest in seen or action.dest in _LAUNCH_OPTIONS + ("help",):
            continue
        seen.add(action.dest)
        value = getattr(args, action.dest, action.default)
        if value == action.default:
            continue
        if action.nargs == 0:  # several flags may set one dest (--tie-embeddings / --no-tie-embeddings)
            action = next((a for a in parser._actions if a.dest == action.dest and a.nargs == 0
                           and getattr(a, "const", None) == value), action)
        option = action.option_strings[-1] if action.option_strings[-1].startswith("--") else action.option_strings[0]
        if action.nargs == 0:  # store_const / store_true / store_false
            argv.append(option)
        elif isinstance(value, (list, tuple)):
            argv.append(f"{option}={','.join(str(v) for v in value)}")
        else:
            argv.append(f"{option}={value}")
    return argv


def _launch(args: argparse.Namespace) -> int:
    from dsmr.training.distributed import launch, launched_by_torchrun, torchrun_command
    from dsmr.errors import DsmrError

    if launched_by_torchrun():
        raise DsmrError("--nproc starts torchrun itself; under torchrun give the process count to torchrun")
    cmd = torchrun_command(args.nproc, relaunch_argv(args), nnodes=args.nnodes, node_rank=args.node_rank,
                           master_addr=args.master_addr, master_port=args.master_port)
    return launch(cmd)


def run(args: argparse.Namespace) -> int:
    import dataclasses
    from pathlib import Path

    from dsmr.data.cache import TokenCache
    from dsmr.sharing.run_folder import read_config
    from dsmr.evaluation.perplexity import format_report
    from dsmr.training.trainer import train
    from dsmr.training.config import TrainConfig

    if args.nproc is not None:
        return _launch(args)
    if args.nnodes is not None:
        from dsmr.errors import DsmrError

        raise DsmrError("--nnodes needs --nproc (processes per machine)")
    set_threads(args.threads, say="dsmr train" if args.progress else None)
    _check_values(args)
    cache = TokenCache(args.cache)
    # the cache's files still hold what was written (DsmrError naming the damaged file; a cache without
    # checksums is refused: nothing would tell an all-zero split from a real one)
    cache.verify()
    given = _explicit_options(args)
    if args.resume:
        base = TrainConfig.from_dict(read_config(Path(args.out))["train"])
        cfg = dataclasses.replace(base, **given)
    elif args.init_from is not None:
        from dsmr.sharing.hub import read_model_config
        from dsmr.training.config import fine_tuning_config

        cfg = fine_tuning_config(read_model_config(args.init_from), given, args.init_from)
    else:
        cfg = TrainConfig(**given)
    result = train(cfg, cache, args.out, progress=args.progress, resume=args.resume)
    if result["world_size"] > 1 and int(os.environ.get("RANK", "0")) != 0:
        return 130 if result["interrupted"] else 0  # rank 0 reports for all
    if args.json:
        print(json.dumps(result))
    else:
        if result["ppl"] is not None:
            print(format_report(result, title=f"validation after {result['steps']} steps"))
        peak = result.get("train_peak_memory_bytes") or 0
        print(f"train: loss {result['train_loss']:.4f}, {result['train_tokens_per_s']:.0f} tokens/s"
              + (f", peak memory {peak / 2**20:.1f} MiB" if peak else "")
              if result["train_loss"] is not None else f"train: {result['steps']} steps")
        print(f"run folder: {result['run_dir']}")
    if result["interrupted"]:
        nproc = f" --nproc {result['world_size']}" if result["world_size"] > 1 else ""
        print(f"dsmr train: interrupted at step {result['steps']}; continue with: dsmr train{nproc} --cache "
              f"{args.cache} --out {args.out} --resume", file=sys.stderr)
        return 130
    return 0
