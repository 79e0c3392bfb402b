"""Does a model's music look like the data? Generate a set of pieces, then `dsmr metrics` them against a
reference split, and the reference's train split against the same split as the yardstick.

Each sample continues the first --prompt-seconds of a random piece of the --prompt-split (0: from
nothing) to --seconds of music; only the notes after the prompt are compared (the continuation is written
to OUT/continuations/, the whole piece to OUT/pieces/). Reference pieces are cropped to the same length
(--seconds minus the prompt), so that length-dependent statistics (range, distinct pitches) compare alike.

    .venv/bin/python benchmarks/bench_metrics.py MODEL --cache CACHE --out OUT [--samples 24] [--seconds 40]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model", help="run folder, exported folder or Hub repo id")
    p.add_argument("--cache", required=True, help="token cache (prompts and reference)")
    p.add_argument("--out", required=True, type=Path)
    p.add_argument("--samples", type=int, default=24)
    p.add_argument("--seconds", type=float, default=40.0, help="length of each piece, prompt included")
    p.add_argument("--prompt-seconds", type=float, default=5.0)
    p.add_argument("--prompt-split", default="validation")
    p.add_argument("--split", default="test", help="reference split")
    p.add_argument("--reference-pieces", type=int, default=60)
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--top-p", type=float, default=0.95)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args()

    import torch

    from dsmr.cache import TokenCache
    from dsmr.checkpoint import load_model
    from dsmr.generate import SamplingConfig, generate, half_weight_model

    torch.set_num_threads(args.threads)
    model, tokenizer, config = load_model(args.model)
    model = half_weight_model(model)
    segment_len = config.get("segment_len") or config["train"]["segment"]
    cache = TokenCache(args.cache)
    rng = np.random.default_rng(args.seed)
    picks = rng.choice(cache.num_pieces(args.prompt_split), size=args.samples,
                       replace=args.samples > cache.num_pieces(args.prompt_split))
    (args.out / "pieces").mkdir(parents=True, exist_ok=True)
    (args.out / "continuations").mkdir(parents=True, exist_ok=True)
    start, tokens = time.perf_counter(), 0
    for k, i in enumerate(picks):
        prompt = None
        if args.prompt_seconds > 0:
            ids = cache.piece(args.prompt_split, int(i))
            n = 1
            while n < len(ids) and tokenizer.seconds(ids[:n]) < args.prompt_seconds:
                n += 1
            prompt = ids[:n]
        sampling = SamplingConfig(temperature=args.temperature, top_p=args.top_p, seed=args.seed * 1000 + k,
                                  max_seconds=args.seconds, max_tokens=None, stop_at_eos=False)
        result = generate(model, tokenizer, segment_len, prompt, sampling, progress=False)
        tokens += result.summary()["tokens"]
        name = f"s{k:03d}.mid"
        tokenizer.decode_to_file(result.ids, args.out / "pieces" / name)
        score = tokenizer.decode(result.ids).to("second")
        boundary = result.prompt_seconds if prompt is not None else 0.0
        cont = score.clip(boundary, score.end() + 1, clip_end=False).shift_time(-boundary)
        cont.dump_midi(args.out / "continuations" / name)
        print(f"sample {k + 1}/{args.samples}: {result.summary()['tokens']} events", file=sys.stderr)
    wall = time.perf_counter() - start
    crop = args.seconds - max(args.prompt_seconds, 0.0)
    runs = {}
    for label, gen in (("generated", [str(args.out / "continuations")]), ("yardstick", [args.cache])):
        cmd = [sys.executable, "-m", "dsmr", "metrics", *gen, "--reference", args.cache, "--split", args.split,
               "--max-pieces", str(args.reference_pieces), "--crop-seconds", str(crop), "--no-progress",
               "--plot", str(args.out / f"{label}.png")]
        table = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
        (args.out / f"{label}.txt").write_text(table)
        report = json.loads(subprocess.run([*cmd, "--json"], check=True, capture_output=True, text=True).stdout)
        runs[label] = {"sets": report["sets"], "distances": report["distances"]}
        print(f"== {label}\n{table}")
    summary = {"model": args.model, "samples": args.samples, "seconds": args.seconds,
               "prompt_seconds": args.prompt_seconds, "generated_tokens": tokens, "generation_wall_s": wall,
               "temperature": args.temperature, "top_p": args.top_p, **runs}
    (args.out / "summary.json").write_text(json.dumps(summary, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
