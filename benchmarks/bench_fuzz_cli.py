"""Benchmark (not a test): absurd numbers on every numeric option, and tampered model folders, through the
real `dsmr` command in fresh processes.

1. Every option of `dsmr train`, `eval`, `generate`, `study`, `data build` and `export` whose argparse type is
   a number gets -1, 0, nan, inf, 1e12 and a word, on a real (tiny) cache and run folder made here.
   A value the option accepts runs the command for real (a couple of steps, a few events).
2. A tiny run folder is tampered with (sizes of 1e6 and 1e9 in config.json, strings where numbers belong,
   `"model": null`, int32 weights, one flipped byte that keeps every weight finite) and given to
   `dsmr eval` and `dsmr generate`.

Counted: tracebacks (stderr shows one), hangs (no exit within --timeout s), and wrong results with exit 0
(a tampered folder that a command accepted). Exit 2 with one line is what a refusal should look like.

    .venv/bin/python benchmarks/bench_fuzz_cli.py [--timeout 120] [--json-out OUT.json]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

VALUES = ("-1", "0", "nan", "inf", "1e12", "word")
COMMANDS = ("train", "eval", "generate", "study", "data build", "export")
TINY = ["--layers", "2", "--d-model", "32", "--heads", "2", "--segment", "32", "--batch-size", "2",
        "--budget", "64", "--long-layers", "1", "--short", "32", "--eval-every", "0", "--threads", "1"]


def run(argv: list[str], timeout: float) -> dict:
    start = time.perf_counter()
    try:
        proc = subprocess.run([sys.executable, "-m", "dsmr", *argv], capture_output=True, text=True,
                              timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"argv": argv, "hang": True, "seconds": timeout}
    return {"argv": argv, "code": proc.returncode, "traceback": "Traceback" in proc.stderr,
            "lines": len(proc.stderr.strip().splitlines()), "err": proc.stderr.strip()[-300:],
            "seconds": round(time.perf_counter() - start, 1)}


def setup(root: Path, timeout: float) -> tuple[Path, Path]:
    """A cache of a few made-up pieces and a run folder trained on it for 2 steps."""
    import symusic

    midi = root / "midi"
    midi.mkdir()
    for k in range(8):
        score = symusic.Score(480)
        track = symusic.Track()
        for i in range(200):
            track.notes.append(symusic.Note(i * 120, 240, 48 + (i * (k + 3)) % 36, 40 + (i * 7) % 80))
        score.tracks.append(track)
        score.dump_midi(str(midi / f"piece{k}.mid"))
    made = run(["data", "build", "--corpus", "folder", "--root", str(midi), "--cache", str(root / "cache"),
                "--workers", "1", "--fractions", "0.5,0.25,0.25", "--no-progress"], timeout)
    assert made.get("code") == 0, made
    cache = next((root / "cache").iterdir())
    trained = run(["train", "--cache", str(cache), "--out", str(root / "run"), "--steps", "2", *TINY,
                   "--no-progress"], timeout)
    assert trained.get("code") == 0, trained
    return cache, root / "run"


def base_argv(command: str, cache: Path, run_dir: Path, out: Path) -> list[str]:
    return {
        "train": ["train", "--cache", str(cache), "--out", str(out / "train"), "--steps", "2", *TINY,
                  "--no-progress"],
        "eval": ["eval", str(run_dir), "--cache", str(cache), "--no-progress"],
        "generate": ["generate", str(run_dir), "--out", str(out / "g.mid"), "--max-tokens", "20", "--no-progress"],
        "study": ["study", "--cache", str(cache), "--out", str(out / "study"), "--variants", "none", "--steps", "2",
                  "--layers", "2", "--d-model", "32", "--heads", "2", "--segment", "32", "--batch-size", "2",
                  "--horizon", "32", "--budget", "64", "--short", "16", "--long-layers", "1", "--no-progress"],
        "data build": ["data", "build", "--corpus", "folder", "--root", str(out / "nothing"), "--cache",
                       str(out / "cache"), "--no-progress"],
        "export": ["export", str(run_dir), str(out / "export")],
    }[command]


def numeric_options(command: str) -> list[str]:
    import argparse as ap

    from dsmr.cli import build_parser

    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, ap._SubParsersAction))
    words = command.split()
    p = sub.choices[words[0]]
    if len(words) > 1:
        p = next(a for a in p._actions if isinstance(a, ap._SubParsersAction)).choices[words[1]]
    return [a.option_strings[0] for a in p._actions
            if a.option_strings and getattr(a.type, "__name__", "") in ("int", "float")]


def tampered_folders(run_dir: Path, root: Path) -> dict[str, Path]:
    import shutil

    import torch
    from safetensors.torch import load_file, save_file

    cases = {"d_model 1e6": {"d_model": 10**6}, "vocab 1e9": {"vocab_size": 10**9}, "d_ff 1e9": {"d_ff": 10**9},
             "horizons 'abc'": {"horizons": "abc"}, "d_model '64'": {"d_model": "64"}, "model null": None}
    out = {}
    for name, change in cases.items():
        folder = root / f"tampered-{len(out)}"
        shutil.copytree(run_dir, folder)
        config = json.loads((folder / "config.json").read_text())
        config["model"] = None if change is None else {**config["model"], **change}
        (folder / "config.json").write_text(json.dumps(config))
        out[name] = folder
    folder = root / "tampered-int32"
    shutil.copytree(run_dir, folder)
    for weights in folder.glob("*.safetensors"):
        save_file({k: v.to(torch.int32) for k, v in load_file(weights).items()}, weights)
    out["int32 weights"] = folder
    folder = root / "tampered-flip"
    shutil.copytree(run_dir, folder)
    for weights in folder.glob("*.safetensors"):
        data = bytearray(weights.read_bytes())
        data[8 + int.from_bytes(data[:8], "little") + 101] ^= 1  # one mantissa bit: finite
        weights.write_bytes(bytes(data))
    out["flipped byte"] = folder
    return out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--timeout", type=float, default=120.0)
    p.add_argument("--json-out", type=Path)
    args = p.parse_args()

    with tempfile.TemporaryDirectory(prefix="dsmr-fuzz-cli-") as tmp:
        root = Path(tmp)
        cache, run_dir = setup(root, args.timeout)
        rows = []
        for command in COMMANDS:
            for option in numeric_options(command):
                for value in VALUES:
                    out = root / f"out-{len(rows)}"
                    out.mkdir()
                    r = run([*base_argv(command, cache, run_dir, out), option, value], args.timeout)
                    rows.append({"command": command, "option": option, "value": value, **r})
        tampered = []
        for name, folder in tampered_folders(run_dir, root).items():
            for argv in (["eval", str(folder), "--cache", str(cache), "--no-progress"],
                         ["generate", str(folder), "--out", str(root / "t.mid"), "--max-tokens", "20",
                          "--no-progress"]):
                tampered.append({"case": name, **run(argv, args.timeout)})
    summary = {
        "option_runs": len(rows), "options": len({(r["command"], r["option"]) for r in rows}),
        "tracebacks": sum(bool(r.get("traceback")) for r in rows + tampered),
        "hangs": sum(bool(r.get("hang")) for r in rows + tampered),
        "accepted": sum(r.get("code") == 0 for r in rows),
        "refused_in_one_line": sum(r.get("code") == 2 and r.get("lines") == 1 for r in rows),
        "tampered_runs": len(tampered), "tampered_accepted": sum(r.get("code") == 0 for r in tampered),
    }
    bad = [r for r in rows + tampered if r.get("traceback") or r.get("hang")]
    print(json.dumps(summary, indent=1))
    for r in bad[:20]:
        print("BAD:", json.dumps(r)[:400])
    if args.json_out:
        args.json_out.write_text(json.dumps({"summary": summary, "options": rows, "tampered": tampered}, indent=1))
    return 1 if bad or summary["tampered_accepted"] else 0


if __name__ == "__main__":
    sys.exit(main())
