"""How full are the training batches at the end of an epoch? Busy lanes per batch over the last steps of
epoch 0, for lanes that drain (each epoch ends when its last piece does) and lanes that refill from the next
epoch's order (what `dsmr train` does). Reads only piece lengths: no training.

    .venv/bin/python benchmarks/bench_epoch_end.py CACHE [--batch-size 8] [--segment 128] [--last 300]
"""

from __future__ import annotations

import argparse
import json
import sys

import numpy as np


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("cache")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--segment", type=int, default=128)
    p.add_argument("--last", type=int, default=300, help="steps at the end of the epoch to report")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()

    from dsmr.data.cache import TokenCache
    from dsmr.data.stream import PieceStream

    cache = TokenCache(args.cache)
    tok = cache.tokenizer
    rows = {}
    for refill in (False, True):
        stream = PieceStream(cache.pieces("train"), args.batch_size, args.segment, tok.bos_id, tok.eos_id,
                             tok.pad_id, seed=args.seed, refill=refill)
        steps = stream.steps_for_epochs(1)
        batches = iter(stream)
        busy = np.array([int(next(batches).token_mask[:, 0].sum()) for _ in range(steps)])
        last = busy[-args.last:]
        rows["refill" if refill else "drain"] = {
            "steps_in_epoch": steps, f"mean_busy_lanes_last_{args.last}": float(last.mean()),
            f"min_busy_lanes_last_{args.last}": int(last.min()),
            "steps_with_idle_lanes": int((busy < args.batch_size).sum())}
    print(json.dumps({"cache": args.cache, "batch_size": args.batch_size, "segment": args.segment, **rows}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
