"""Benchmark (not a test): fuzz encode_file and `dsmr data build` with mutated copies of real MIDI files.

N mutated copies of real MIDI files (MAESTRO when present, else pieces this script makes with symusic)
go through `PerformanceTokenizer.encode_file` one at a time in a worker process, and then all of them
through `build_cache` (what `dsmr data build` runs). Counted:

* crashes: anything but a token array or a DsmrError (also a worker process that dies);
* hangs: a file that takes more than --hang-seconds (the worker is killed and restarted);
* peak memory: the largest resident set of the worker over all files (ru_maxrss), and the largest
  increase one file caused over the worker's previous high-water mark.

Mutations: byte flips and overwrites, inserted and deleted bytes, truncation, random header fields
(format, track count, division, including 0 and SMPTE values), huge variable-length delta times, and
tempo events of extreme values — the ways a hostile but fair user's file goes wrong.

    .venv/bin/python benchmarks/bench_fuzz.py --n 300            # a few minutes on 2 cores
    .venv/bin/python benchmarks/bench_fuzz.py --n 10000 --seed 0  # the figure in docs/guarantees.md
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import random
import resource
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
MAESTRO = REPO.parent / "shared" / "data" / "maestro-v3.0.0"


def seed_files(root: Path, count: int, rng: random.Random) -> list[bytes]:
    """Bytes of `count` real MIDI files: MAESTRO's smallest-to-medium files when present, else made here."""
    paths = sorted(root.rglob("*.mid*")) if root.is_dir() else []
    if paths:
        paths = sorted(rng.sample(paths, min(len(paths), count * 4)), key=lambda p: p.stat().st_size)[:count]
        return [p.read_bytes() for p in paths]
    import symusic

    out = []
    for i in range(count):
        score = symusic.Score(480, ttype="second")
        track = symusic.Track("Piano", program=0, ttype="second")
        for j in range(40 + 10 * i):
            start = j * 0.11 + rng.random() * 0.05
            track.notes.append(symusic.Note(start, 0.05 + rng.random(), 30 + rng.randrange(60),
                                            1 + rng.randrange(126), ttype="second"))
        for t in range(0, 10, 2):
            track.controls.append(symusic.ControlChange(float(t), 64, 127 if t % 4 == 0 else 0, ttype="second"))
        score.tempos.append(symusic.Tempo(0.0, qpm=60.0 + rng.randrange(120), ttype="second"))
        score.tracks.append(track)
        out.append(score.dumps_midi())
    return out


def mutate(data: bytes, rng: random.Random) -> bytes:
    data = bytearray(data)
    for _ in range(rng.choice([1, 1, 1, 2, 3])):
        if not data:
            break
        pos = rng.randrange(len(data))
        kind = rng.choice(["flip", "set", "insert", "delete", "truncate", "header", "delta", "tempo"])
        if kind == "flip":
            data[pos] ^= 1 << rng.randrange(8)
        elif kind == "set":
            data[pos] = rng.randrange(256)
        elif kind == "insert":
            data[pos:pos] = bytes(rng.randrange(256) for _ in range(rng.randint(1, 16)))
        elif kind == "delete":
            del data[pos:pos + rng.randint(1, 16)]
        elif kind == "truncate":
            del data[pos:]
        elif kind == "header" and len(data) >= 14:
            offset = rng.choice([8, 10, 12])
            value = rng.choice([0, 1, 2, 0xFFFF, 0xE728, 0x8000, rng.randrange(0x10000)])
            data[offset:offset + 2] = value.to_bytes(2, "big")
        elif kind == "delta":
            data[pos:pos] = rng.choice([b"\xff\xff\xff\x7f", b"\x8f\xff\xff\x7f", b"\x81\x80\x80\x00"])
        elif kind == "tempo":
            data[pos:pos] = b"\x00\xff\x51\x03" + rng.choice([b"\xff\xff\xff", b"\x00\x00\x01", b"\x00\x00\x00"])
    return bytes(data)


def _worker(conn) -> None:
    import numpy as np

    from dsmr.errors import DsmrError
    from dsmr.data.tokenizers.performance import PerformanceTokenizer

    tok = PerformanceTokenizer()
    while True:
        path = conn.recv()
        if path is None:
            return
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        start = time.perf_counter()
        try:
            ids = tok.encode_file(path)
            ok = isinstance(ids, np.ndarray) and ids.ndim == 1 and ids.size and 0 <= ids.min() \
                and ids.max() < tok.vocab_size
            outcome = "ok" if ok else "crash: invalid ids"
        except DsmrError:
            outcome = "refused"
        except BaseException as err:  # what the benchmark is looking for
            outcome = f"crash: {type(err).__name__}: {str(err)[:120]}"
        after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        conn.send((outcome, time.perf_counter() - start, after, after - before))


class Worker:
    def __init__(self):
        self.parent, child = mp.Pipe()
        self.proc = mp.get_context("fork").Process(target=_worker, args=(child,), daemon=True)
        self.proc.start()

    def stop(self, kill: bool = False) -> None:
        if kill:
            self.proc.kill()
        else:
            self.parent.send(None)
        self.proc.join(5)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=300, help="mutated files (default 300)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--seeds", type=int, default=20, help="real files to mutate (default 20)")
    parser.add_argument("--root", type=Path, default=MAESTRO, help="MAESTRO root (else files made here)")
    parser.add_argument("--hang-seconds", type=float, default=10.0)
    parser.add_argument("--no-build", action="store_true", help="skip the build_cache pass")
    args = parser.parse_args()

    rng = random.Random(args.seed)
    seeds = seed_files(args.root, args.seeds, rng)
    source = f"MAESTRO ({args.root})" if args.root.is_dir() else "files made by this script"
    print(f"{args.n} mutated copies of {len(seeds)} real MIDI files from {source}; seed {args.seed}")

    with tempfile.TemporaryDirectory(prefix="dsmr-fuzz-") as tmp:
        folder = Path(tmp) / "midi"
        folder.mkdir()
        paths = []
        for i in range(args.n):
            path = folder / f"f{i:05d}.mid"
            path.write_bytes(mutate(rng.choice(seeds), rng))
            paths.append(path)

        counts = {"ok": 0, "refused": 0, "crash": 0, "hang": 0}
        crashes, slowest, peak_kb, worst_step_kb = [], 0.0, 0, 0
        worker = Worker()
        start = time.perf_counter()
        for path in paths:
            worker.parent.send(str(path))
            if not worker.parent.poll(args.hang_seconds):
                counts["hang"] += 1
                crashes.append(f"{path.name}: hang (> {args.hang_seconds} s)")
                worker.stop(kill=True)
                worker = Worker()
                continue
            try:
                outcome, seconds, rss_kb, step_kb = worker.parent.recv()
            except EOFError:  # the worker died (a segfault, the OOM killer)
                counts["crash"] += 1
                crashes.append(f"{path.name}: worker died (exit {worker.proc.exitcode})")
                worker = Worker()
                continue
            kind = outcome.split(":")[0]
            counts[kind] += 1
            if kind == "crash":
                crashes.append(f"{path.name}: {outcome}")
            slowest = max(slowest, seconds)
            peak_kb, worst_step_kb = max(peak_kb, rss_kb), max(worst_step_kb, step_kb)
        worker.stop()
        encode_s = time.perf_counter() - start
        print(f"encode_file: {counts['ok']} encoded, {counts['refused']} refused (DsmrError), "
              f"{counts['crash']} crashes, {counts['hang']} hangs; slowest file {slowest:.2f} s; "
              f"worker peak RSS {peak_kb / 1024:.0f} MB (largest rise for one file {worst_step_kb / 1024:.0f} MB); "
              f"{encode_s:.0f} s")
        for line in crashes[:20]:
            print("  " + line)

        if not args.no_build:
            from dsmr.data.cache_build import build_cache
            from dsmr.data.corpora import folder_listing
            from dsmr.data.tokenizers.performance import PerformanceTokenizer

            before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
            t0 = time.perf_counter()
            try:
                files, skipped = folder_listing(folder)
                summary = build_cache(files, Path(tmp) / "cache", PerformanceTokenizer(), workers=1,
                                      progress=False, source={"corpus": "fuzz"}, skipped=skipped)
                result = (f"{sum(summary.pieces.values())} pieces, {len(summary.skipped)} skipped with a reason, "
                          f"{sum(summary.tokens.values()):,} tokens")
                build_crash = 0
            except Exception as err:
                from dsmr.errors import DsmrError

                build_crash = 0 if isinstance(err, DsmrError) else 1
                result = f"{type(err).__name__}: {err}"
            after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
            print(f"build_cache: {result}; {build_crash} crashes; {time.perf_counter() - t0:.0f} s; "
                  f"process peak RSS {after / 1024:.0f} MB (was {before / 1024:.0f} MB before the build)")
            counts["crash"] += build_crash
    return 1 if counts["crash"] or counts["hang"] else 0


if __name__ == "__main__":
    sys.exit(main())
