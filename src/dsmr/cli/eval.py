"""`dsmr eval`: full-piece perplexity of a trained model over a split of a token cache."""

from __future__ import annotations

import argparse
import json
import math

from dsmr.cli.common import (add_device, add_json, add_no_progress, add_precision, add_threads, add_token_cache,
                             add_weights)
from dsmr.core.options import bounded
from dsmr.generation.defaults import PRECISIONS


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "eval", help="full-piece perplexity of a checkpoint on a cache split",
        description="Stream every piece of a split through the model with its own memory schedule and "
                    "report perplexity, NLL by position in the piece, tokens/s, peak memory and the "
                    "recurrent-state size.")
    p.add_argument("checkpoint", metavar="RUN_OR_CHECKPOINT",
                   help="a run folder, an exported model folder (dsmr export), a Hub repo id "
                        "(owner/name), or a .safetensors file with config.json beside it")
    add_token_cache(p, required=True, help="token cache folder (same tokenizer as the run)")
    p.add_argument("--split", default="validation", help="split to evaluate: validation or test (default validation)")
    add_weights(p)
    p.add_argument("--batch-size", type=bounded(int, 1, 65536), default=None, help="lanes (default: the run's batch size)")
    p.add_argument("--segment", type=bounded(int, 1, 65536), default=None,
                   help="tokens per segment (default: the run's; a different one changes the context)")
    p.add_argument("--max-pieces", type=bounded(int, 1, 10**6), default=None, help="evaluate the first N pieces only")
    add_precision(p, choices=PRECISIONS, default="float32",
                  help="round the projection weights to float16 or int8, as `dsmr generate --precision` keeps "
                       "them: what that rounding costs in perplexity (products here stay float32; default float32)")
    add_device(p)
    add_threads(p)
    add_json(p)
    add_no_progress(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from dsmr.data.cache import TokenCache
    from dsmr.sharing.run_folder import check_tokenizer
    from dsmr.sharing.loader import load_model
    from dsmr.cli.common import set_threads
    from dsmr.errors import DsmrError
    from dsmr.evaluation.perplexity import evaluate, format_report
    from dsmr.core.runtime import resolve_device

    for name in ("batch_size", "segment", "max_pieces"):
        value = getattr(args, name)
        if value is not None and value < 1:
            raise DsmrError(f"--{name.replace('_', '-')} must be >= 1, got {value}")
    set_threads(args.threads)
    cache = TokenCache(args.cache)
    if args.split not in cache.splits:
        raise DsmrError(f"no split {args.split!r} in the cache {cache.path}; it has {', '.join(cache.splits)}")
    device = resolve_device(args.device)
    model = load_model(args.checkpoint, device=device, which=args.weights)
    tokenizer, config = model.tokenizer, model.run_config
    check_tokenizer(config, cache.tokenizer, f"the cache {cache.path}")
    if args.precision != "float32":
        from dsmr.generation import with_precision

        model = with_precision(model, args.precision)
    pieces = cache.pieces(args.split)[: args.max_pieces]
    if not pieces:
        raise DsmrError(f"split {args.split!r} of the cache {cache.path} has no pieces")
    try:
        result = _evaluate(evaluate, model, pieces, args, config, tokenizer, device)
    except OverflowError:  # math.exp of an enormous loss
        result = {"nll": math.inf}
    nll = result.get("nll")
    if nll is None or not math.isfinite(nll):
        raise DsmrError(f"{args.checkpoint}: the weights give a non-finite loss ({nll}) on {args.split}; the "
                        f"checkpoint is damaged or diverged (try --weights latest, or an earlier run)")
    result.update(split=args.split, checkpoint=str(args.checkpoint), precision=args.precision)
    if args.json:
        print(json.dumps(result))
    else:
        print(format_report(result, title=f"{args.split} ({args.checkpoint})"))
    return 0


def _evaluate(evaluate, model, pieces, args, config, tokenizer, device) -> dict:
    train_cfg = config.get("train", {})
    return evaluate(
        model, pieces,
        batch_size=args.batch_size or train_cfg.get("eval_batch_size") or train_cfg.get("batch_size") or 8,
        segment_len=args.segment or model.segment_len or 256,
        pad_id=tokenizer.pad_id, bos_id=tokenizer.bos_id, eos_id=tokenizer.eos_id,
        device=device, amp=train_cfg.get("amp", True), notes=tokenizer.count_notes(pieces), progress=args.progress)
