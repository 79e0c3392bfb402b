"""`dsmr train`: train a DSMR model on a token cache into a run folder (see docs/training.md).

Every option defaults to dsmr.train.TrainConfig, so `dsmr train --cache DIR --out RUN` alone trains a
small two-scale model. With --resume the run's saved config is the base and only the options given on
the command line change it (dsmr.train refuses changes that would alter what the model computes).

`--nproc N` re-launches the same command through torch.distributed.run (torchrun) with N processes
per node (DistributedDataParallel, see docs/distributed.md); `torchrun ... -m dsmr train ...` works too.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

from dsmr.cli.common import add_no_progress
from dsmr.cli.schedule import _int_list, add_schedule_arguments


def _float_pair(text: str) -> tuple[float, float]:
    try:
        values = tuple(float(x) for x in text.split(","))
    except ValueError:
        values = ()
    if len(values) != 2:
        raise argparse.ArgumentTypeError(f"expected two numbers like 0.9,0.95, got {text!r}")
    return values

# TrainConfig fields set from options of the same name (argparse dest).
_FIELDS = (
    "schedule", "budget", "long_layers", "short", "horizon", "binary_layers", "horizons",
    "layers", "d_model", "heads", "d_ff", "dropout", "tie_embeddings",
    "head_dim", "rotary_fraction", "norm", "init_std", "memory", "horizon_warmup", "embedding_decay", "betas",
    "gate", "gate_per_head", "gate_init", "gate_lambda",
    "segment", "batch_size", "baseline", "context",
    "lr", "min_lr_ratio", "warmup_steps", "weight_decay", "grad_clip", "grad_accum", "steps", "epochs",
    "eval_every", "eval_at_start", "val_split", "val_pieces", "eval_batch_size", "log_every", "save_every",
    "tensorboard", "seed", "device", "amp", "compile",
)
# Options of the launcher itself: not passed on to the processes it starts.
_LAUNCH_OPTIONS = ("nproc", "nnodes", "node_rank", "master_addr", "master_port")
_PARSER: argparse.ArgumentParser | None = None  # the train parser, to rebuild a command line from args


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "train", help="train a DSMR model (full-piece streaming) into a run folder",
        description="Train a DSMR model on the train split of a token cache, streaming whole pieces "
                    "segment by segment. Writes config.json, weights (safetensors), a resumable trainer "
                    "state and metrics.jsonl into --out. Ctrl-C saves a resumable checkpoint.")
    p.add_argument("--cache", required=True, help="token cache folder (from `dsmr data build`)")
    p.add_argument("--out", required=True, help="run folder to create (or to continue with --resume)")
    p.add_argument("--resume", action="store_true", help="continue the run in --out from its latest checkpoint")
    p.add_argument("--json", action="store_true",
                   help="print one JSON object (final validation metrics plus steps) on stdout")
    add_no_progress(p)

    add_schedule_arguments(p)
    p.add_argument("--binary-layers", dest="memory_layers", type=_int_list, metavar="I,J,...",
                   help="binary: the layers sharing the budget (same as --memory-layers)")
    # None marks "not given", so --resume can tell explicit options from defaults (filled from TrainConfig).
    p.set_defaults(schedule=None, budget=None, long_layers=None, short=None, horizon=None)

    m = p.add_argument_group("model")
    m.add_argument("--layers", type=int, help="decoder blocks (default 6)")
    m.add_argument("--d-model", type=int, help="model width (default 256)")
    m.add_argument("--heads", type=int, help="attention heads (default 4)")
    m.add_argument("--d-ff", type=int, help="feed-forward width (default 4 x d-model)")
    m.add_argument("--dropout", type=float, help="dropout (default 0)")
    m.add_argument("--tie-embeddings", dest="tie_embeddings", action="store_const", const=True,
                   help="output head tied to the token embedding (default: a separate head)")
    m.add_argument("--no-tie-embeddings", dest="tie_embeddings", action="store_const", const=False,
                   help="a separate output head (the default)")
    m.add_argument("--head-dim", type=int, help="width of each attention head (default d-model / heads)")
    m.add_argument("--rotary-fraction", type=float, help="share of each head's dims rotated by RoPE (default 1)")
    m.add_argument("--norm", choices=("layernorm", "rmsnorm"), help="normalization layers (default layernorm)")
    m.add_argument("--init-std", type=float, help="std of the initial weights (default 0.02)")
    m.add_argument("--memory", choices=("kv", "hidden"),
                   help="what the memory holds in training: hidden (default) = detached layer inputs, projected "
                        "with the current weights every segment; kv = detached keys/values (faster)")
    m.add_argument("--horizon-warmup", type=int, metavar="STEPS",
                   help="horizon curriculum: every layer's horizon grows linearly from 0 to its schedule "
                        "over the first STEPS steps (default 0: the full schedule from the start)")

    g = p.add_argument_group("learned gates")
    g.add_argument("--gate", choices=("none", "soft", "ste"), help="gate on memory attention (default none)")
    g.add_argument("--gate-per-head", action="store_const", const=True, help="one gate per head, not per layer")
    g.add_argument("--gate-init", type=float, help="initial gate logit (default 3: sigmoid ~ 0.95)")
    g.add_argument("--gate-lambda", type=float, help="weight of the budget penalty (default 0)")

    d = p.add_argument_group("data")
    d.add_argument("--segment", type=int, help="tokens per segment (default 256)")
    d.add_argument("--batch-size", type=int, help="lanes per batch (default 8)")
    d.add_argument("--baseline", choices=("excerpt",),
                   help="full-attention reference: no memory, fixed-length excerpts of --context tokens")
    d.add_argument("--context", type=int, help="excerpt length for --baseline excerpt (default: --segment)")

    o = p.add_argument_group("optimization")
    o.add_argument("--lr", type=float, help="peak learning rate (default 1e-3)")
    o.add_argument("--min-lr-ratio", type=float, help="cosine decay floor as a fraction of --lr (default 0.1)")
    o.add_argument("--warmup-steps", type=int, help="linear warmup steps (default 5%% of the steps, <= 500)")
    o.add_argument("--weight-decay", type=float, help="AdamW weight decay (default 0.1)")
    o.add_argument("--no-embedding-decay", dest="embedding_decay", action="store_const", const=False,
                   help="no weight decay on the token embedding (matrices of the blocks keep it)")
    o.add_argument("--betas", type=_float_pair, metavar="B1,B2", help="AdamW betas (default 0.9,0.95)")
    o.add_argument("--grad-clip", type=float, help="gradient norm clip, 0 = off (default 1.0)")
    o.add_argument("--grad-accum", type=int, help="segment batches per optimizer step (default 1)")
    length = o.add_mutually_exclusive_group()
    length.add_argument("--steps", type=int, help="optimizer steps (default 1000)")
    length.add_argument("--epochs", type=int, help="passes over every training piece")

    e = p.add_argument_group("evaluation and logging")
    e.add_argument("--eval-every", type=int, help="steps between full-piece validations, 0 = end only (default 250)")
    e.add_argument("--eval-at-start", action="store_const", const=True, help="also validate at step 0")
    e.add_argument("--val-split", help="split to validate on (default validation)")
    e.add_argument("--val-pieces", type=int, help="validate on the first N pieces only (default all)")
    e.add_argument("--eval-batch-size", type=int, help="lanes for validation (default --batch-size)")
    e.add_argument("--log-every", type=int, help="steps between metrics.jsonl records (default 10)")
    e.add_argument("--save-every", type=int, help="steps between checkpoint saves (default --eval-every)")
    e.add_argument("--no-tensorboard", dest="tensorboard", action="store_const", const=False,
                   help="no TensorBoard logs even when tensorboard is installed")

    r = p.add_argument_group("runtime")
    r.add_argument("--seed", type=int, help="seed for initialization and data order (default 0)")
    r.add_argument("--device", help="auto, cpu, cuda, cuda:1, ... (default auto)")
    r.add_argument("--no-amp", dest="amp", action="store_const", const=False, help="no bf16 autocast on CUDA")
    r.add_argument("--threads", type=int, default=None,
                   help="CPU threads for torch (default: torch's choice; 1 is fastest for small models "
                        "on a busy machine)")
    r.add_argument("--compile", action="store_const", const=True,
                   help="torch.compile the model for training (worth it on GPUs for long runs)")

    n = p.add_argument_group("several processes (DistributedDataParallel; see docs/distributed.md)")
    n.add_argument("--nproc", type=int, help="start N training processes on this machine through torchrun "
                   "(one per GPU; gloo on CPU); resume with the same total")
    n.add_argument("--nnodes", help="with --nproc: number of machines (each runs the same command)")
    n.add_argument("--node-rank", type=int, help="with --nnodes: this machine's index, 0 .. nnodes-1")
    n.add_argument("--master-addr", help="with --nnodes: address of the node-rank 0 machine")
    n.add_argument("--master-port", type=int, help="with --nnodes: its port (default 29500)")
    p.set_defaults(func=run)
    global _PARSER
    _PARSER = p


def _explicit_options(args: argparse.Namespace) -> dict:
    given = {name: getattr(args, name) for name in _FIELDS
             if name != "binary_layers" and getattr(args, name, None) is not None}
    if args.memory_layers is not None:
        given["binary_layers"] = tuple(args.memory_layers)
    if "horizons" in given:
        given["horizons"] = tuple(given["horizons"])
        given.setdefault("schedule", "explicit")
    if "binary_layers" in given:
        given.setdefault("schedule", "binary")
    return given


_FLOAT_OPTIONS = ("dropout", "rotary_fraction", "init_std", "gate_init", "gate_lambda", "lr", "min_lr_ratio",
                  "weight_decay", "grad_clip")


def _check_values(args: argparse.Namespace) -> None:
    """DsmrError (exit 2) for values argparse lets through: NaN and infinities, a negative seed, an --out
    that is a file or cannot be written."""
    import math

    from dsmr.errors import DsmrError
    from dsmr.files import check_output_folder

    for name in _FLOAT_OPTIONS:
        value = getattr(args, name, None)
        if value is not None and not math.isfinite(value):
            raise DsmrError(f"--{name.replace('_', '-')} must be a finite number, got {value}")
    if args.betas is not None and not all(math.isfinite(b) for b in args.betas):
        raise DsmrError(f"--betas must be finite numbers, got {args.betas}")
    if args.seed is not None and not 0 <= args.seed < 2**63:
        raise DsmrError(f"--seed must be a whole number >= 0, got {args.seed}")
    check_output_folder(args.out, "--out")


def set_threads(threads: int | None) -> None:
    from dsmr.errors import DsmrError

    if threads is not None:
        if threads < 1:
            raise DsmrError(f"--threads must be >= 1, got {threads}")
        import torch

        torch.set_num_threads(threads)


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
    from dsmr.distributed import launch, launched_by_torchrun, torchrun_command
    from dsmr.errors import DsmrError

    if launched_by_torchrun():
        raise DsmrError("--nproc starts torchrun itself; under torchrun give the process count to torchrun")
    cmd = torchrun_command(args.nproc, relaunch_argv(args), nnodes=args.nnodes, node_rank=args.node_rank,
                           master_addr=args.master_addr, master_port=args.master_port)
    return launch(cmd)


def run(args: argparse.Namespace) -> int:
    import dataclasses
    from pathlib import Path

    from dsmr.cache import TokenCache
    from dsmr.checkpoint import read_config
    from dsmr.evaluate import format_report
    from dsmr.train import TrainConfig, train

    if args.nproc is not None:
        return _launch(args)
    if args.nnodes is not None:
        from dsmr.errors import DsmrError

        raise DsmrError("--nnodes needs --nproc (processes per machine)")
    set_threads(args.threads)
    _check_values(args)
    cache = TokenCache(args.cache)
    if cache.manifest.get("checksums") is not None:
        cache.verify()  # the cache's files still hold what was written (DsmrError naming the damaged file)
    given = _explicit_options(args)
    if args.resume:
        base = TrainConfig.from_dict(read_config(Path(args.out))["train"])
        cfg = dataclasses.replace(base, **given)
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
        print(f"train: loss {result['train_loss']:.4f}, {result['train_tokens_per_s']:.0f} tokens/s"
              if result["train_loss"] is not None else f"train: {result['steps']} steps")
        print(f"run folder: {result['run_dir']}")
    if result["interrupted"]:
        nproc = f" --nproc {result['world_size']}" if result["world_size"] > 1 else ""
        print(f"dsmr train: interrupted at step {result['steps']}; continue with: dsmr train{nproc} --cache "
              f"{args.cache} --out {args.out} --resume", file=sys.stderr)
        return 130
    return 0
