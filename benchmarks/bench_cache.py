"""Benchmark: build the MAESTRO token cache from scratch with 1 and 2 workers.

Each run builds into a fresh temporary folder (nothing reused) and times the whole build_cache call:
hashing every file, tokenizing in the process pool, writing the arrays and the manifest.

    .venv/bin/python benchmarks/bench_cache.py [--root ../shared/data/maestro-v3.0.0] [--workers 1,2]
"""

from __future__ import annotations

import argparse
import os
import platform
import resource
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", type=Path, default=REPO.parent / "shared" / "data" / "maestro-v3.0.0",
                        help="MAESTRO root (the folder with maestro-v3.0.0.csv)")
    parser.add_argument("--workers", default="1,2", help="comma-separated worker counts to time")
    parser.add_argument("--tokenizer", default="performance")
    parser.add_argument("--limit", type=int, default=None, help="only the first N files (every split kept)")
    args = parser.parse_args()

    from dsmr.data.cache_build import build_cache
    from dsmr.data.corpora import limit_files
    from dsmr.data.maestro import maestro_files
    from dsmr.data.tokenizers.registry import make_tokenizer

    files = limit_files(maestro_files(args.root), args.limit)
    size_mb = sum(f.path.stat().st_size for f in files) / 1e6
    tokenizer = make_tokenizer(args.tokenizer)
    print(f"MAESTRO at {args.root}: {len(files)} files, {size_mb:.1f} MB; tokenizer {args.tokenizer}")
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs visible, "
          f"Python {platform.python_version()}")
    print(f"load average before: {os.getloadavg()[0]:.2f} (other jobs on this machine slow the runs down)")
    print(f"{'workers':>7}  {'wall s':>7}  {'cpu s':>6}  {'files/s':>8}  {'tokens/s':>12}  {'tokens':>12}  skipped")
    for workers in (int(w) for w in args.workers.split(",")):
        with tempfile.TemporaryDirectory(prefix="dsmr-bench-cache-") as tmp:
            cpu_before = _cpu_seconds()
            start = time.perf_counter()
            summary = build_cache(files, tmp, tokenizer, workers=workers, progress=False,
                                  source={"corpus": "maestro", "root": str(args.root)})
            wall = time.perf_counter() - start
            cpu = _cpu_seconds() - cpu_before
        tokens = sum(summary.tokens.values())
        print(f"{workers:>7}  {wall:>7.2f}  {cpu:>6.2f}  {len(files) / wall:>8.1f}  {tokens / wall:>12,.0f}  {tokens:>12,}  "
              f"{len(summary.skipped)}")
        sys.stdout.flush()
    return 0


def _cpu_seconds() -> float:
    """CPU time of this process and its finished worker processes (user + system)."""
    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


if __name__ == "__main__":
    sys.exit(main())
