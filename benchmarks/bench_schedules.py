"""Benchmark: train the same small model with the full, uniform, two-scale and none schedules.

Every schedule trains for the same number of steps on a slice of MAESTRO, each in a fresh Python process
(so the peak-memory figures do not inherit each other's allocator pools), and the table shows training
tokens/s, peak memory and recurrent-state bytes, with ratios against `full`.

    .venv/bin/python benchmarks/bench_schedules.py [--cache runs/bench-maestro-cache] [--limit 16]
        [--steps 30] [--layers 6 --d-model 256 --heads 4 --segment 256 --batch-size 4]

The cache is built with `dsmr data build --corpus maestro --limit N` when --cache holds none.
tokens/s counts real (non-padding) training targets per second of training steps, after the first
--skip-steps steps (allocator and kernel warm-up); each schedule runs --repeats times, interleaved, and
the fastest run is reported (other jobs on a shared machine only ever slow a run down). Peak memory: CUDA max_memory_allocated, or on CPU
the rise of the process's peak resident memory during training (dsmr.core.runtime.PeakMemory).

--mfu adds each schedule's model FLOP/s (benchmarks/machine_peak.py: forward + backward matmuls of the
model per real training token) and its fraction of this machine's float32 matmul peak, measured in the
same run on the same thread count (a 2048 x 2048 matmul, best of 10, in every worker right after it
trains and once at the end; the highest is the peak):

    .venv/bin/python benchmarks/bench_schedules.py --threads 2 --mfu --schedules two-scale,none --repeats 2
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SCHEDULES = ("full", "uniform", "two-scale", "none")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--cache", type=Path, default=REPO / "runs" / "bench-maestro-cache",
                   help="token cache (folder or root); built from MAESTRO when absent")
    p.add_argument("--maestro", type=Path, default=REPO.parent / "shared" / "data" / "maestro-v3.0.0",
                   help="MAESTRO root, to build the cache")
    p.add_argument("--limit", type=int, default=16, help="MAESTRO files in the slice (when building)")
    p.add_argument("--schedules", default=",".join(SCHEDULES))
    p.add_argument("--explicit", action="append", default=[], metavar="NAME=H0,H1,...",
                   help="also time these horizons under this name (repeatable), e.g. the study's "
                        "two-scale-inverse=64,64,512,512")
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--repeats", type=int, default=2, help="runs per schedule; the fastest is reported")
    p.add_argument("--skip-steps", type=int, default=5, help="first steps left out of tokens/s")
    p.add_argument("--layers", type=int, default=6)
    p.add_argument("--d-model", type=int, default=256)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--segment", type=int, default=256)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--horizon", type=int, default=1024, help="full: every layer's horizon")
    p.add_argument("--budget", type=int, default=2560, help="uniform and two-scale budget")
    p.add_argument("--long-layers", type=int, default=2)
    p.add_argument("--short", type=int, default=128)
    p.add_argument("--memory", choices=("kv", "hidden"), default="kv",
                   help="what the state holds in training (default kv, as the figures in docs/training.md)")
    p.add_argument("--device", default="auto")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    p.add_argument("--json", action="store_true", help="print the results as one JSON object")
    p.add_argument("--mfu", action="store_true",
                   help="also measure the matmul peak and report model FLOP/s as a fraction of it (CPU)")
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)  # internal: one schedule, JSON out
    return p.parse_args(argv)


def ensure_cache(args) -> Path:
    from dsmr.data.cache import TokenCache
    from dsmr.errors import DsmrError

    try:
        return TokenCache(args.cache).path
    except DsmrError:
        pass
    print(f"building a MAESTRO slice ({args.limit} files) into {args.cache} ...", file=sys.stderr)
    subprocess.run([sys.executable, "-m", "dsmr", "data", "build", "--corpus", "maestro", "--root",
                    str(args.maestro), "--cache", str(args.cache), "--limit", str(args.limit), "--no-progress"],
                   check=True, stdout=subprocess.DEVNULL)
    return TokenCache(args.cache).path


def explicit_horizons(args) -> dict[str, tuple[int, ...]]:
    """--explicit NAME=H0,H1,...: name -> horizons."""
    out = {}
    for spec in args.explicit:
        name, _, horizons = spec.partition("=")
        try:
            out[name] = tuple(int(h) for h in horizons.split(","))
        except ValueError:
            sys.exit(f"--explicit {spec!r}: expected NAME=H0,H1,... (one horizon per layer)")
    return out


def run_worker(args) -> None:
    """Train one schedule and print its figures as JSON (runs in its own process)."""
    import torch

    from dsmr.data.cache import TokenCache
    from dsmr.core.runtime import resolve_device
    from dsmr.training.trainer import train
    from dsmr.training.config import TrainConfig, make_run_schedule
    from dsmr.training.config import make_model_config
    from machine_peak import training_flops_per_token

    if args.threads:
        torch.set_num_threads(args.threads)
    explicit = explicit_horizons(args)
    schedule = "explicit" if args.worker in explicit else args.worker
    cfg = TrainConfig(layers=args.layers, d_model=args.d_model, heads=args.heads, segment=args.segment,
                      batch_size=args.batch_size, schedule=schedule, horizons=explicit.get(args.worker),
                      horizon=args.horizon,
                      budget=args.budget, long_layers=args.long_layers, short=args.short, steps=args.steps,
                      eval_every=0, val_split=None, log_every=1, tensorboard=False, device=args.device,
                      memory=args.memory, tie_embeddings=True)
    with tempfile.TemporaryDirectory(prefix="dsmr-bench-") as tmp:
        result = train(cfg, TokenCache(args.cache), Path(tmp) / "run", progress=False)
        records = [json.loads(line) for line in (Path(tmp) / "run" / "metrics.jsonl").read_text().splitlines()]
    timed = [r for r in records if "loss" in r and r["step"] > args.skip_steps]
    tokens = sum(r["tokens"] for r in timed)
    seconds = sum(r["tokens"] / r["tokens_per_s"] for r in timed)
    model_cfg = make_model_config(cfg, TokenCache(args.cache).tokenizer.vocab_size)
    peak = None
    if args.mfu:  # the peak in this process right after training, on its threads (the run keeps the best)
        from machine_peak import matmul_peak

        peak = matmul_peak(args.threads)
    print(json.dumps({
        "schedule": args.worker,
        "flops_per_token": training_flops_per_token(model_cfg, args.segment),
        "matmul_peak_flops": peak,
        "horizons": list(make_run_schedule(cfg).horizons),
        "tokens_per_s": tokens / seconds if seconds else None,
        "peak_memory_bytes": result["train_peak_memory_bytes"],
        "memory_method": result["train_memory_method"],
        "state_bytes": result["train_state_bytes"],
        "loss": result["train_loss"],
        "device": str(resolve_device(args.device)),
    }))


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.worker:
        run_worker(args)
        return 0
    args.cache = ensure_cache(args)
    from dsmr.data.cache import TokenCache

    summary = TokenCache(args.cache).summary()
    print(f"cache {args.cache}: {summary['pieces']['train']} train pieces, {summary['tokens']['train']:,} tokens")
    print(f"model: {args.layers} layers, d_model {args.d_model}, {args.heads} heads; segment {args.segment}, "
          f"batch {args.batch_size} lanes, {args.steps} steps (tokens/s after step {args.skip_steps})")
    print(f"machine: {platform.machine()}, {os.cpu_count()} CPUs visible, load average "
          f"{os.getloadavg()[0]:.2f} before (other jobs slow the runs down)")
    sys.stdout.flush()
    runs: dict[str, list[dict]] = {}
    argv_worker = [a for a in (argv if argv is not None else sys.argv[1:]) if a != "--json"]
    for round_ in range(args.repeats):  # rounds interleave the schedules, so a busy spell hits all of them
        for schedule in [*args.schedules.split(","), *explicit_horizons(args)]:
            out = subprocess.run([sys.executable, __file__, *argv_worker, "--cache", str(args.cache), "--worker",
                                  schedule], capture_output=True, text=True)
            if out.returncode:
                print(f"schedule {schedule} failed:\n{out.stderr}", file=sys.stderr)
                return 1
            runs.setdefault(schedule, []).append(json.loads(out.stdout.strip().splitlines()[-1]))
            print(f"  round {round_ + 1}: {schedule} done", file=sys.stderr)
    # the least disturbed run of each schedule: the fastest (peak memory and state do not depend on load)
    results = [max(rs, key=lambda r: r["tokens_per_s"] or 0) for rs in runs.values()]
    if args.mfu:
        from machine_peak import matmul_peak

        # the best of every peak measured in this run (one per worker and one here): a busy spell only
        # ever lowers a measurement, and the highest peak gives the most conservative fraction
        peak = max([matmul_peak(args.threads)] + [r["matmul_peak_flops"] for rs in runs.values() for r in rs])
        for r in results:
            r["model_flops_per_s"] = r["tokens_per_s"] * r["flops_per_token"]
            r["matmul_peak_flops"] = peak
            r["mfu"] = r["model_flops_per_s"] / peak
    if args.json:
        print(json.dumps({"results": results}))
    else:
        print(table(results))
    return 0


def table(results: list[dict]) -> str:
    full = next((r for r in results if r["schedule"] == "full"), results[0])
    mib = 1024 * 1024
    w = max(10, *(len(r["schedule"]) for r in results))  # the widest name (--explicit ones are long)
    lines = [f"{'schedule':<{w}} {'horizons':<32} {'tokens/s':>9} {'x full':>7} {'peak MiB':>9} {'x full':>7} "
             f"{'state MiB':>9} {'x full':>7}",
             "-" * (88 + w)]
    for r in results:
        def ratio(key):
            return f"{r[key] / full[key]:.2f}" if full[key] else "-"
        lines.append(f"{r['schedule']:<{w}} {','.join(map(str, r['horizons'])):<32} {r['tokens_per_s']:>9.0f} "
                     f"{ratio('tokens_per_s'):>7} {r['peak_memory_bytes'] / mib:>9.1f} {ratio('peak_memory_bytes'):>7} "
                     f"{r['state_bytes'] / mib:>9.2f} {ratio('state_bytes'):>7}")
    lines.append(f"device: {full['device']}; peak memory: {full['memory_method']}; state: keys+values of all "
                 "lanes at the training dtype")
    for r in results:
        if "mfu" in r:
            lines.append(f"{r['schedule']:<10} model {r['model_flops_per_s'] / 1e9:.1f} GFLOP/s "
                         f"({r['flops_per_token'] / 1e6:.1f} MFLOP per token) = {100 * r['mfu']:.0f}% of the "
                         f"measured float32 matmul peak {r['matmul_peak_flops'] / 1e9:.1f} GFLOP/s (2048 x 2048)")
    return "\n".join(lines)


if __name__ == "__main__":
    raise SystemExit(main())
