"""Does a model's music hold together? The yardstick for generated music, with real data beside every figure.

For --prompts test pieces (seeded, each at least --seconds long) the model continues the first
--prompt-seconds to --seconds of music; --from-nothing more pieces start from nothing. Compared with
--windows random windows of the test split as long as a continuation (the reference):

* every `dsmr metrics` feature's overlap (OA, 1 = same distribution) and KL, for the continuations, the
  pieces from nothing, and -- the yardstick -- the same test pieces' real continuations;
* note lengths: the longest note and the 99th percentile, against the real data's;
* empty or near-empty outputs (fewer than --min-notes notes after the prompt);
* how each piece keeps its prompt: for pitch range, note density and polyphony, the median over pieces of
  |log(window / prompt)| for the 10 s right after the prompt and the last 10 s, against the same measured on
  the real continuations (0: the texture kept exactly);
* whether it stays in the prompt's harmony (dsmr.evaluation.harmony), for the same two windows: the mean cosine
  similarity of the window's pitch-class profile (seconds each pitch class sounds) to the prompt's, and the
  share of pieces whose window is in the prompt's key or a closely related one (Krumhansl-Schmuckler keys;
  key signatures at most one accidental apart), against the real continuations.

Sampling, unless set: what `dsmr generate` plays with (dsmr.generation.playing_sampling: the model's own
temperature and top-p, the piano's keys, the note guard's defaults for its encoding);
`--max-note-seconds 0 --max-polyphony 0` samples without any guard.
Writes OUT/bench.json, OUT/bench.md (the tables) and OUT/bench.png, and the MIDI of every sample.

    .venv/bin/python benchmarks/bench_metrics.py MODEL --cache CACHE --out OUT [--prompts 32] [--from-nothing 16]
        [--max-note-seconds S] [--max-polyphony N] [--temperature T] [--top-p P] [--label NAME]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import platform
import sys
import time
from pathlib import Path

import numpy as np

KEEP_FEATURES = ("pitch_range", "note_density", "polyphony")
KEEP_WINDOW = 10.0  # seconds of each window compared with the prompt


def main() -> int:
    if sys.argv[1:2] == ["--table"]:  # compare finished runs: --table OUT1 OUT2 ... (folders or bench.json files)
        paths = [Path(d) if Path(d).is_file() else Path(d) / "bench.json" for d in sys.argv[2:]]
        print(comparison_table([json.loads(path.read_text()) for path in paths]))
        return 0
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model", help="run folder, exported model folder or Hub repo id")
    p.add_argument("--cache", required=True, help="token cache of the model's encoding (prompts and reference)")
    p.add_argument("--out", required=True, type=Path)
    p.add_argument("--split", default="test")
    p.add_argument("--prompts", type=int, default=32, help="test pieces to continue")
    p.add_argument("--from-nothing", type=int, default=16, help="pieces generated from nothing")
    p.add_argument("--windows", type=int, default=64, help="reference windows of the split")
    p.add_argument("--prompt-seconds", type=float, default=10.0)
    p.add_argument("--seconds", type=float, default=40.0, help="length of each piece, prompt included")
    p.add_argument("--min-notes", type=int, default=8, help="fewer notes after the prompt: near-empty")
    # unset, each is what `dsmr generate` plays with: the model's own temperature and top-p, the guard's defaults
    p.add_argument("--temperature", type=float, help="default: the model's own (dsmr.generation.defaults.sampling_defaults)")
    p.add_argument("--top-p", type=float, help="default: the model's own")
    p.add_argument("--max-note-seconds", type=float, help="the longest note (default: dsmr generate's; 0: off)")
    p.add_argument("--max-polyphony", type=int, help="the most notes at once (default: dsmr generate's; 0: off)")
    p.add_argument("--precision", default="auto", choices=("auto", "float32", "float16", "int8"))
    p.add_argument("--label", help="name of this configuration in the tables (default: the model folder)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args()

    import torch

    from dsmr.data.cache import TokenCache
    from dsmr.sharing.loader import load_model
    from dsmr.generation import defaults
    from dsmr.generation import generate, playing_sampling, resolve_precision, with_precision

    torch.set_num_threads(args.threads)
    model = load_model(args.model)
    tokenizer, segment_len = model.tokenizer, model.segment_len
    precision = resolve_precision(model, args.precision)  # "auto" resolved as dsmr generate does
    model = with_precision(model, precision)
    own = playing_sampling(model, temperature=args.temperature, top_p=args.top_p,
                           max_note_seconds=args.max_note_seconds, max_polyphony=args.max_polyphony,
                           max_seconds=args.seconds, max_tokens=None, stop_at_eos=False)  # as dsmr generate

    cache = TokenCache(args.cache)
    if cache.tokenizer.config_hash() != tokenizer.config_hash():
        sys.exit(f"{args.cache} is not in {args.model}'s encoding")
    table = np.array([tokenizer.event_seconds(i) or 0.0 for i in range(tokenizer.vocab_size)])
    rng = np.random.default_rng(args.seed)
    pieces = [cache.piece(args.split, i) for i in range(cache.num_pieces(args.split))]
    lengths = np.array([table[ids].sum() for ids in pieces])
    long_enough = np.flatnonzero(lengths >= args.seconds)
    picks = rng.choice(long_enough, size=min(args.prompts, len(long_enough)), replace=False)
    for folder in ("generated", "from-nothing", "real"):
        (args.out / folder).mkdir(parents=True, exist_ok=True)

    def sampling(seed: int):
        return dataclasses.replace(own, seed=seed)

    start, events = time.perf_counter(), 0
    continued, real, scratch = [], [], []
    for k, i in enumerate(picks):
        ids = pieces[i]
        cum = np.cumsum(table[ids])
        prompt = ids[: int(np.searchsorted(cum, args.prompt_seconds)) + 1]
        result = generate(model, tokenizer, segment_len, prompt, sampling(args.seed * 1000 + k), progress=False)
        events += result.new_tokens
        name = f"{k:03d}-{Path(cache.piece_name(args.split, int(i))).stem[:40]}.mid"
        tokenizer.decode_to_file(result.ids, args.out / "generated" / name)
        continued.append(tokenizer.decode(result.ids).to("second"))
        # the real piece up to the same length (plus the notes sounding then: their offs come later)
        whole = ids[: int(np.searchsorted(cum, args.seconds + 5.0)) + 1]
        real.append(tokenizer.decode(whole).to("second"))
        tokenizer.decode_to_file(whole, args.out / "real" / name)
        print(f"continuation {k + 1}/{len(picks)}: {result.new_tokens} events", file=sys.stderr)
    for k in range(args.from_nothing):
        result = generate(model, tokenizer, segment_len, None, sampling(args.seed * 1000 + 500 + k), progress=False)
        events += result.new_tokens
        tokenizer.decode_to_file(result.ids, args.out / "from-nothing" / f"{k:03d}.mid")
        scratch.append(tokenizer.decode(result.ids).to("second"))
        print(f"from nothing {k + 1}/{args.from_nothing}: {result.new_tokens} events", file=sys.stderr)
    wall = time.perf_counter() - start

    length = args.seconds - args.prompt_seconds
    reference = reference_windows(pieces, lengths, tokenizer, table, length, args.windows, rng)
    sets = {
        "generated": [window(s, args.prompt_seconds, args.seconds) for s in continued],
        "from nothing": [window(s, 0.0, length) for s in scratch],
        "real continuations": [window(s, args.prompt_seconds, args.seconds) for s in real],
    }
    report = summarize(sets, reference, continued, real, args, length)
    report.update(model=args.model, label=args.label or Path(args.model).name, precision=precision,
                  generated_events=events, generation_wall_s=wall, events_per_s=events / wall,
                  command="python " + " ".join(sys.argv), machine=platform.platform(),
                  sampling={"temperature": own.temperature, "top_p": own.top_p,
                            "max_note_seconds": own.max_note_seconds, "max_polyphony": own.max_polyphony,
                            "min_pitch": defaults.MIN_PITCH, "max_pitch": defaults.MAX_PITCH})
    (args.out / "bench.json").write_text(json.dumps(report, indent=1))
    (args.out / "bench.md").write_text(markdown(report))
    plot(report, args.out / "bench.png")
    print(markdown(report))
    return 0


def window(score, start: float, end: float):
    """The notes of `score` that start in [start, end), shifted to start at 0 (their lengths kept)."""
    return score.clip(start, end, clip_end=False).shift_time(-start)


def reference_windows(pieces, lengths, tokenizer, table, length, count, rng) -> list:
    """`count` random windows of `length` seconds from random pieces of the split."""
    out = []
    candidates = np.flatnonzero(lengths >= length + 1)
    for i in rng.choice(candidates, size=count, replace=count > len(candidates)):
        ids = pieces[i]
        cum = np.cumsum(table[ids])
        t0 = float(rng.uniform(0, lengths[i] - length))
        part = ids[: int(np.searchsorted(cum, t0 + length + 5.0)) + 1]
        out.append(window(tokenizer.decode(part).to("second"), t0, t0 + length))
    return out


def features(scores, min_notes: int) -> tuple[list[dict], list[np.ndarray], int]:
    """Features of the scores with at least `min_notes` notes, every score's note lengths, and how many
    had fewer."""
    from dsmr.evaluation.music_stats import note_arrays, piece_features

    feats, durations, empty = [], [], 0
    for score in scores:
        notes = note_arrays(score)
        durations.append(notes["end"] - notes["start"])
        if len(notes["start"]) < min_notes:
            empty += 1
            continue
        feats.append(piece_features(score))
    return feats, durations, empty


def keeping(pieces, prompt_seconds: float, seconds: float) -> dict:
    """Median |log(window / prompt)| of each KEEP_FEATURES feature, for the window right after the prompt
    and the last window of the piece."""
    from dsmr.errors import DsmrError
    from dsmr.evaluation.music_stats import piece_features

    spans = {"next 10 s": (prompt_seconds, prompt_seconds + KEEP_WINDOW), "last 10 s": (seconds - KEEP_WINDOW, seconds)}
    out = {}
    for label, (a, b) in spans.items():
        ratios = {f: [] for f in KEEP_FEATURES}
        for score in pieces:
            try:
                before = piece_features(window(score, 0.0, prompt_seconds))
                after = piece_features(window(score, a, b))
            except DsmrError:  # no notes in a window: the texture was not kept
                for f in KEEP_FEATURES:
                    ratios[f].append(np.inf)
                continue
            for f in KEEP_FEATURES:
                ratios[f].append(abs(np.log(max(after[f], 1e-3) / max(before[f], 1e-3))))
        out[label] = {f: float(np.median(v)) for f, v in ratios.items()}
    return out


def summarize(sets: dict, reference: list, continued: list, real: list, args, length: float) -> dict:
    from dsmr.evaluation.music_stats import compare_sets, set_summary

    ref_feats, ref_durations, _ = features(reference, 1)
    ref_notes = np.concatenate(ref_durations)
    report = {"reference": {**strip(set_summary(ref_feats)), "windows": len(reference), "window_seconds": length,
                            "p99_note_s": float(np.percentile(ref_notes, 99)), "longest_note_s": float(ref_notes.max())},
              "sets": {}}
    for name, scores in sets.items():
        feats, durations, empty = features(scores, args.min_notes)
        notes = np.concatenate(durations) if any(len(d) for d in durations) else np.zeros(1)
        report["sets"][name] = {
            "pieces": len(scores), "near_empty": empty, "near_empty_fraction": empty / max(len(scores), 1),
            "p99_note_s": float(np.percentile(notes, 99)), "longest_note_s": float(notes.max()),
            "summary": strip(set_summary(feats)) if feats else None,
            "distances": compare_sets(feats, ref_feats) if feats else None,
        }
    report["keeping"] = {"generated": keeping(continued, args.prompt_seconds, args.seconds),
                         "real continuations": keeping(real, args.prompt_seconds, args.seconds)}
    report["harmony"] = {"generated": harmony(continued, args.prompt_seconds, args.seconds),
                         "real continuations": harmony(real, args.prompt_seconds, args.seconds)}
    return report


def harmony(pieces, prompt_seconds: float, seconds: float) -> dict:
    """For the window after the prompt and the last window: the mean pitch-class similarity to the prompt and
    the share of pieces in the prompt's key or a close one (an empty window: 0 and not kept)."""
    from dsmr.evaluation.harmony import estimate_key, key_relation, pitch_class_profile, profile_similarity
    from dsmr.evaluation.music_stats import note_arrays

    def profile(score, a, b):
        n = note_arrays(window(score, a, b))
        return pitch_class_profile(n["pitch"], n["start"], n["end"])

    spans = {"next 10 s": (prompt_seconds, prompt_seconds + KEEP_WINDOW), "last 10 s": (seconds - KEEP_WINDOW, seconds)}
    out = {}
    for label, (a, b) in spans.items():
        similarity, kept = [], []
        for score in pieces:
            before, after = profile(score, 0.0, prompt_seconds), profile(score, a, b)
            similarity.append(profile_similarity(before, after))
            kept.append(bool(after.any()) and key_relation(estimate_key(before), estimate_key(after)) != "far")
        out[label] = {"pitch_class_similarity": float(np.mean(similarity)), "key_kept": float(np.mean(kept))}
    return out


def strip(summary: dict) -> dict:
    return {k: v for k, v in summary.items() if k != "histograms"}


def markdown(report: dict) -> str:
    sets = report["sets"]
    names = list(sets)
    ref = report["reference"]
    lines = [f"**{report['label']}** ({report['precision']} weights; temperature {report['sampling']['temperature']}, "
             f"top-p {report['sampling']['top_p']}, note guard: longest note "
             f"{report['sampling']['max_note_seconds'] or 'off'}, polyphony {report['sampling']['max_polyphony'] or 'off'}). "
             f"Reference: {ref['windows']} random {ref['window_seconds']:.0f}-s windows of the test split.", "",
             "| feature (OA / KL against the reference) | " + " | ".join(names) + " |",
             "|---|" + "---:|" * len(names)]
    features_ = next((list(s["distances"]) for s in sets.values() if s["distances"]), [])
    for f in features_:
        cells = [f"{sets[n]['distances'][f]['overlap']:.2f} / {sets[n]['distances'][f]['kl']:.2f}"
                 if sets[n]["distances"] else "-" for n in names]
        lines.append(f"| {f} | " + " | ".join(cells) + " |")
    lines += [f"| 99th percentile note length (s; data {ref['p99_note_s']:.2f}) | "
              + " | ".join(f"{sets[n]['p99_note_s']:.2f}" for n in names) + " |",
              f"| longest note (s; data {ref['longest_note_s']:.1f}) | "
              + " | ".join(f"{sets[n]['longest_note_s']:.1f}" for n in names) + " |",
              "| near-empty outputs | " + " | ".join(f"{sets[n]['near_empty']}/{sets[n]['pieces']}" for n in names) + " |",
              ""]
    for scalar in ("polyphony", "note_density", "pitch_range"):
        lines.append(f"Mean {scalar.replace('_', ' ')}: data {ref[scalar]['mean']:.2f}; "
                     + ", ".join(f"{n} {sets[n]['summary'][scalar]['mean']:.2f}" for n in names if sets[n]["summary"]))
    lines += ["", "Keeping the prompt: median |log(window / prompt)| (0 = kept exactly)", "",
              "| | " + " | ".join(f"{w}: {f.replace('_', ' ')}" for w in report["keeping"]["generated"]
                                   for f in KEEP_FEATURES) + " |",
              "|---|" + "---:|" * (2 * len(KEEP_FEATURES))]
    for name, spans in report["keeping"].items():
        lines.append(f"| {name} | " + " | ".join(f"{v:.2f}" for span in spans.values() for v in span.values()) + " |")
    if "harmony" in report:
        lines += ["", "Staying in the prompt's harmony: pitch-class similarity to the prompt (1 = the same) and the "
                      "share of pieces in the prompt's key or a closely related one", "",
                  "| | next 10 s: pitch classes | next 10 s: key kept | last 10 s: pitch classes | last 10 s: key kept |",
                  "|---|---:|---:|---:|---:|"]
        for name, spans in report["harmony"].items():
            lines.append(f"| {name} | " + " | ".join(f"{span['pitch_class_similarity']:.2f} | {span['key_kept']:.2f}"
                                                    for span in spans.values()) + " |")
    lines += ["", f"{report['generated_events']:,} events generated in {report['generation_wall_s']:.0f} s "
                  f"({report['events_per_s']:.0f} events/s). Command: `{report['command']}`", ""]
    return "\n".join(lines)


TABLE_FEATURES = ("polyphony", "note_density", "duration_histogram", "pitch_range", "mean_ioi")


def comparison_table(reports: list[dict], set_name: str = "generated") -> str:
    """One row per benchmark run (continuations of the prompts), the real continuations' row last."""
    head = ("| configuration | " + " | ".join(f"{f.replace('_', ' ')} OA" for f in TABLE_FEATURES)
            + " | p99 note (s) | longest (s) | near-empty | keeps density (next / last 10 s) "
            "| pitch classes as the prompt's (next / last 10 s) | key kept (next / last 10 s) |")
    lines = [head, "|---|" + "---:|" * (len(TABLE_FEATURES) + 6)]

    def row(label: str, s: dict, keep: dict, harmony: dict | None) -> str:
        oa = " | ".join(f"{s['distances'][f]['overlap']:.2f}" for f in TABLE_FEATURES)
        dens = f"{keep['next 10 s']['note_density']:.2f} / {keep['last 10 s']['note_density']:.2f}"
        if harmony:  # reports made before the harmony row: "-"
            pcs = f"{harmony['next 10 s']['pitch_class_similarity']:.2f} / {harmony['last 10 s']['pitch_class_similarity']:.2f}"
            key = f"{harmony['next 10 s']['key_kept']:.2f} / {harmony['last 10 s']['key_kept']:.2f}"
        else:
            pcs = key = "-"
        return (f"| {label} | {oa} | {s['p99_note_s']:.2f} | {s['longest_note_s']:.1f} | "
                f"{s['near_empty']}/{s['pieces']} | {dens} | {pcs} | {key} |")

    for r in reports:
        lines.append(row(r["label"], r["sets"][set_name], r["keeping"]["generated"],
                         r.get("harmony", {}).get("generated")))
    last = reports[-1]
    lines.append(row("the test pieces' real continuations", last["sets"]["real continuations"],
                     last["keeping"]["real continuations"], last.get("harmony", {}).get("real continuations")))
    ref = last["reference"]
    lines.append(f"\nOA: overlap with {ref['windows']} random {ref['window_seconds']:.0f}-s windows of the test split "
                 f"(1 = the same distribution). Notes in those windows: 99th percentile {ref['p99_note_s']:.2f} s, "
                 f"longest {ref['longest_note_s']:.1f} s. Keeps density: median |log(density after / in the prompt)|.")
    return "\n".join(lines)


def plot(report: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sets = {n: s for n, s in report["sets"].items() if s["distances"]}
    features_ = list(next(iter(sets.values()))["distances"]) if sets else []
    fig, ax = plt.subplots(figsize=(10, 3.6))
    width = 0.8 / max(len(sets), 1)
    for k, (name, s) in enumerate(sets.items()):
        ax.bar(np.arange(len(features_)) + k * width, [s["distances"][f]["overlap"] for f in features_], width,
               label=name)
    ax.set_xticks(np.arange(len(features_)) + 0.4 - width / 2)
    ax.set_xticklabels([f.replace("_", " ") for f in features_], rotation=30, ha="right", fontsize=8)
    ax.set_ylabel("overlap with the test split")
    ax.set_ylim(0, 1)
    ax.set_title(f"{report['label']}: feature overlap (1 = like the data)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


if __name__ == "__main__":
    sys.exit(main())
