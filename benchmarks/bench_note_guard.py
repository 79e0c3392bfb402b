"""What the note guard costs per event: NoteGuard.banned() and update() over a real piece's events, one lane,
against the time of nothing (the loop alone). Run beside a decoding benchmark to compare with a step.

    .venv/bin/python benchmarks/bench_note_guard.py CACHE [--split test] [--events 20000]
"""

from __future__ import annotations

import argparse
import json
import sys
import time


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("cache")
    p.add_argument("--split", default="test")
    p.add_argument("--events", type=int, default=20000)
    args = p.parse_args()

    import numpy as np
    import torch

    from dsmr.generation import defaults
    from dsmr.data.cache import TokenCache
    from dsmr.generation.note_guard import NoteGuard

    torch.set_num_threads(1)
    cache = TokenCache(args.cache)
    ids = np.concatenate([cache.piece(args.split, i) for i in range(cache.num_pieces(args.split))])[:args.events]
    tokens = [torch.tensor([int(t)]) for t in ids]
    guard = NoteGuard(cache.tokenizer, 1, defaults.MAX_NOTE_SECONDS, defaults.MAX_POLYPHONY)
    best = {}
    for name in ("loop alone", "guard"):
        times = []
        for _ in range(3):
            start = time.perf_counter()
            for t in tokens:
                if name == "guard":
                    guard.banned()
                    guard.update(t)
            times.append((time.perf_counter() - start) / len(tokens))
        best[name] = min(times)
    print(json.dumps({"events": len(tokens), "us_per_event": round((best["guard"] - best["loop alone"]) * 1e6, 1),
                      "max_note_seconds": defaults.MAX_NOTE_SECONDS, "max_polyphony": defaults.MAX_POLYPHONY}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
