"""Music statistics of generated vs reference pieces (Yang & Lerch 2020; MusPy's metrics).

Per piece (all non-drum notes, times in seconds):

    pitch_class_entropy   entropy (bits) of the pitch-class histogram (0 .. log2 12 = 3.58)
    pitch_range           highest minus lowest MIDI pitch
    used_pitches          number of distinct MIDI pitches
    polyphony             mean number of notes sounding, over the 10 ms frames where at least one sounds
    note_density          notes per second (first onset to last release)
    mean_ioi              mean inter-onset interval (s) between distinct onsets
    mean_velocity         mean MIDI velocity

and four histograms: pitch class (12 bins), inter-onset interval and note duration (log-spaced bins in
seconds), velocity (8 bins of 16).

Per set, each scalar feature's distribution over pieces is estimated with a Gaussian kernel density
(Silverman's bandwidth, on a grid spanning both sets), and each histogram is pooled over all the set's
notes. A generated set is compared with the reference set by the overlapping area of the two
distributions (OA, 1 = identical, 0 = disjoint) and the KL divergence KL(reference || generated) in nats
(0 = identical; densities floored at 1e-6 of their peak, histograms smoothed by 1e-6, so it stays finite).
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np

from dsmr.errors import DsmrError

SCALARS = ("pitch_class_entropy", "pitch_range", "used_pitches", "polyphony", "note_density", "mean_ioi",
           "mean_velocity")
SCALAR_LABELS = {"pitch_class_entropy": "pitch-class entropy (bits)", "pitch_range": "pitch range (semitones)",
                 "used_pitches": "distinct pitches", "polyphony": "polyphony (notes sounding)",
                 "note_density": "note density (notes/s)", "mean_ioi": "mean inter-onset interval (s)",
                 "mean_velocity": "mean velocity"}
TIME_BINS = (0.0, 0.025, 0.05, 0.1, 0.2, 0.4, 0.8, 1.6, math.inf)  # seconds: IOI and duration histograms
TIME_BIN_LABELS = ("<25ms", "25-50ms", "50-100ms", ".1-.2s", ".2-.4s", ".4-.8s", ".8-1.6s", ">1.6s")
HISTOGRAMS = {"pitch_class": tuple("C C# D D# E F F# G G# A A# B".split()), "ioi": TIME_BIN_LABELS,
              "duration": TIME_BIN_LABELS, "velocity": tuple(f"{i * 16}-{i * 16 + 15}" for i in range(8))}
FRAME = 0.01  # seconds: the polyphony grid
ONSET_TOLERANCE = 0.001  # onsets closer than this are one onset (a chord)
MIDI_SUFFIXES = (".mid", ".midi")


# ------------------------------------------------------------------------------------------- one piece


def note_arrays(score) -> dict[str, np.ndarray]:
    """start, end (s), pitch, velocity of the non-drum notes of a symusic Score, sorted by start."""
    score = score.to("second")
    notes = [n for t in score.tracks if not t.is_drum for n in t.notes]
    start = np.array([n.time for n in notes], dtype=np.float64)
    dur = np.array([max(n.duration, 0.0) for n in notes], dtype=np.float64)
    order = np.argsort(start, kind="stable")
    return {"start": start[order], "end": (start + dur)[order],
            "pitch": np.array([n.pitch for n in notes], dtype=np.int64)[order],
            "velocity": np.array([n.velocity for n in notes], dtype=np.int64)[order]}


def piece_features(score) -> dict:
    """Scalar features and histograms (counts) of one piece; DsmrError for a piece with no notes."""
    n = note_arrays(score)
    if len(n["start"]) == 0:
        raise DsmrError("the piece has no notes")
    start, end, pitch, vel = n["start"], n["end"], n["pitch"], n["velocity"]
    pc = np.bincount(pitch % 12, minlength=12).astype(np.float64)
    p = pc / pc.sum()
    entropy = float(-(p[p > 0] * np.log2(p[p > 0])).sum())
    onsets = _distinct(start)
    ioi = np.diff(onsets)
    span = float(end.max() - start.min())
    features = {
        "notes": int(len(start)),
        "seconds": float(end.max()),
        "pitch_class_entropy": entropy,
        "pitch_range": int(pitch.max() - pitch.min()),
        "used_pitches": int(len(np.unique(pitch))),
        "polyphony": _polyphony(start, end),
        "note_density": float(len(start) / span) if span > 0 else float(len(start)),
        "mean_ioi": float(ioi.mean()) if len(ioi) else 0.0,
        "mean_velocity": float(vel.mean()),
    }
    hist = {"pitch_class": pc, "ioi": _time_hist(ioi), "duration": _time_hist(end - start),
            "velocity": np.bincount(np.clip(vel // 16, 0, 7), minlength=8).astype(np.float64)}
    features["histograms"] = {k: v.tolist() for k, v in hist.items()}
    return features


def _distinct(times: np.ndarray) -> np.ndarray:
    keep = np.concatenate([[True], np.diff(times) > ONSET_TOLERANCE])
    return times[keep]


def _time_hist(values: np.ndarray) -> np.ndarray:
    return np.histogram(values, bins=np.array(TIME_BINS))[0].astype(np.float64)


def _polyphony(start: np.ndarray, end: np.ndarray) -> float:
    """Mean number of notes sounding over the FRAME-long frames in which at least one sounds."""
    first = np.floor(start / FRAME).astype(np.int64)
    last = np.maximum(np.ceil(end / FRAME).astype(np.int64), first + 1)  # a note sounds in >= 1 frame
    base = first.min()
    count = np.zeros(int(last.max() - base) + 1, dtype=np.int64)
    np.add.at(count, first - base, 1)
    np.add.at(count, last - base, -1)
    sounding = np.cumsum(count)[:-1]
    on = sounding[sounding > 0]
    return float(on.mean()) if len(on) else 0.0


# ----------------------------------------------------------------------------------------------- sets


def set_summary(pieces: Sequence[dict]) -> dict:
    """Mean and standard deviation of each scalar feature, and the pooled histograms (normalized)."""
    if not pieces:
        raise DsmrError("an empty set of pieces")
    out = {"pieces": len(pieces), "notes": int(sum(p["notes"] for p in pieces)),
           "seconds": float(sum(p["seconds"] for p in pieces))}
    for name in SCALARS:
        values = np.array([p[name] for p in pieces], dtype=np.float64)
        out[name] = {"mean": float(values.mean()), "std": float(values.std())}
    hist = {}
    for name in HISTOGRAMS:
        total = np.sum([p["histograms"][name] for p in pieces], axis=0)
        hist[name] = (total / total.sum()).tolist() if total.sum() > 0 else total.tolist()
    out["histograms"] = hist
    return out


def kde(values: np.ndarray, grid: np.ndarray) -> np.ndarray:
    """Gaussian kernel density of `values` on `grid` (Silverman's rule; a floor for constant data)."""
    values = np.asarray(values, dtype=np.float64)
    n = len(values)
    spread = min(values.std(ddof=1) if n > 1 else 0.0,
                 (np.subtract(*np.percentile(values, [75, 25])) / 1.34) or math.inf)
    if not spread > 0 or not math.isfinite(spread):
        spread = max(values.std(ddof=1) if n > 1 else 0.0, 0.0)
    width = max(0.9 * spread * n ** -0.2, (grid[-1] - grid[0]) / 200.0, 1e-9)
    z = (grid[:, None] - values[None, :]) / width
    return np.exp(-0.5 * z * z).sum(axis=1) / (n * width * math.sqrt(2 * math.pi))


def overlap_and_kl(reference: np.ndarray, generated: np.ndarray, dx: float | None = None) -> tuple[float, float]:
    """(overlapping area, KL(reference || generated) in nats) of two densities on a grid of step dx, or
    of two histograms (dx None)."""
    p, q = np.asarray(reference, np.float64), np.asarray(generated, np.float64)
    if dx is None:
        p, q = p / p.sum(), q / q.sum()
        p, q = (p + 1e-6) / (p + 1e-6).sum(), (q + 1e-6) / (q + 1e-6).sum()
        oa = float(np.minimum(p, q).sum())
        return oa, float(np.sum(p * np.log(p / q)))
    p, q = p / (p.sum() * dx), q / (q.sum() * dx)
    oa = float(np.minimum(p, q).sum() * dx)
    floor = 1e-6 * max(p.max(), q.max())
    pf, qf = np.maximum(p, floor), np.maximum(q, floor)
    pf, qf = pf / (pf.sum() * dx), qf / (qf.sum() * dx)
    return oa, float(np.sum(pf * np.log(pf / qf)) * dx)


def scalar_grid(a: np.ndarray, b: np.ndarray, points: int = 512) -> np.ndarray:
    lo, hi = min(a.min(), b.min()), max(a.max(), b.max())
    pad = max(hi - lo, abs(hi) * 0.1, 1e-3) * 0.25
    return np.linspace(lo - pad, hi + pad, points)


def compare_sets(generated: Sequence[dict], reference: Sequence[dict]) -> dict:
    """OA and KL for each scalar feature (kernel densities) and each histogram (pooled over notes)."""
    out = {}
    for name in SCALARS:
        g = np.array([p[name] for p in generated], dtype=np.float64)
        r = np.array([p[name] for p in reference], dtype=np.float64)
        grid = scalar_grid(g, r)
        oa, kl = overlap_and_kl(kde(r, grid), kde(g, grid), dx=float(grid[1] - grid[0]))
        out[name] = {"overlap": oa, "kl": kl}
    for name in HISTOGRAMS:
        g = np.sum([p["histograms"][name] for p in generated], axis=0)
        r = np.sum([p["histograms"][name] for p in reference], axis=0)
        oa, kl = overlap_and_kl(r, g)
        out[f"{name}_histogram"] = {"overlap": oa, "kl": kl}
    return out


# --------------------------------------------------------------------------------------------- inputs


def midi_files(paths: Iterable) -> list[Path]:
    """MIDI files named, or found (recursively, sorted) in the folders named."""
    out = []
    for path in map(Path, paths):
        if path.is_dir():
            found = sorted(p for p in path.rglob("*") if p.suffix.lower() in MIDI_SUFFIXES and p.is_file())
            if not found:
                raise DsmrError(f"no MIDI files (.mid, .midi) in {path}")
            out += found
        elif path.is_file():
            out.append(path)
        else:
            raise DsmrError(f"not found: {path}")
    return out


def features_of_files(paths: Sequence[Path], crop_seconds: float | None = None) -> tuple[list[dict], list[dict]]:
    """(features of each readable piece with notes, [{"path", "reason"}] of those skipped)."""
    from dsmr.data.midi import load_midi

    pieces, skipped = [], []
    for path in paths:
        try:
            score = load_midi(path)
            feats = piece_features(crop(score, crop_seconds))
        except DsmrError as err:
            skipped.append({"path": str(path), "reason": str(err)})
            continue
        pieces.append({"name": str(path), **feats})
    return pieces, skipped


def features_of_cache(cache, split: str, max_pieces: int | None = None, crop_seconds: float | None = None,
                      seed: int = 0, progress: bool = False) -> tuple[list[dict], list[dict]]:
    """Features of the pieces of a cache split (decoded by the cache's tokenizer); a random sample of
    `max_pieces` (fixed by `seed`) when the split has more."""
    if split not in cache.splits:
        raise DsmrError(f"no split {split!r} in the cache {cache.path}; it has {', '.join(cache.splits)}")
    n = cache.num_pieces(split)
    if n == 0:
        raise DsmrError(f"split {split!r} of the cache {cache.path} has no pieces")
    index = list(range(n))
    if max_pieces is not None and max_pieces < n:
        index = sorted(np.random.default_rng(seed).choice(n, size=max_pieces, replace=False).tolist())
    tokenizer = cache.tokenizer
    pieces, skipped = [], []
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=len(index), desc=f"{split} pieces", unit="piece", leave=False)
    for i in index:
        ids = cache.piece(split, i)
        if crop_seconds is not None:  # decode only what the crop needs (whole pieces can be 20k events)
            ids = ids[: _ids_within(tokenizer, ids, crop_seconds)]
        name = cache.piece_name(split, i)
        try:
            pieces.append({"name": name, **piece_features(crop(tokenizer.decode(ids), crop_seconds))})
        except DsmrError as err:
            skipped.append({"path": name, "reason": str(err)})
        if bar is not None:
            bar.update(1)
    if bar is not None:
        bar.close()
    return pieces, skipped


def _ids_within(tokenizer, ids: np.ndarray, seconds: float) -> int:
    """How many leading events cover at least `seconds` of music (bisection on tokenizer.seconds)."""
    lo, hi = 0, len(ids)
    if tokenizer.seconds(ids) <= seconds:
        return hi
    while hi - lo > 64:
        mid = (lo + hi) // 2
        if tokenizer.seconds(ids[:mid]) <= seconds:
            lo = mid
        else:
            hi = mid
    return hi + 64  # notes that start before the crop end after their note-off events: keep a margin


def crop(score, seconds: float | None):
    """The notes of `score` that start before `seconds` (all notes when None)."""
    if seconds is None:
        return score
    score = score.to("second")
    return score.clip(0, seconds, clip_end=False)


# --------------------------------------------------------------------------------------------- report


def metrics_report(sets: dict[str, list[dict]], reference: str) -> dict:
    """{"sets": {name: summary}, "distances": {name: compare_sets(set, reference)}} for every set but the
    reference."""
    ref = sets[reference]
    return {"reference": reference,
            "sets": {name: set_summary(pieces) for name, pieces in sets.items()},
            "distances": {name: compare_sets(pieces, ref) for name, pieces in sets.items() if name != reference}}


def format_report(report: dict) -> str:
    ref = report["reference"]
    names = list(report["sets"])
    lines = []
    for name in names:
        s = report["sets"][name]
        lines.append(f"{name}: {s['pieces']} pieces, {s['notes']} notes, {s['seconds'] / 60:.1f} min"
                     + (" (reference)" if name == ref else ""))
    width = max([24] + [len(n) + 2 for n in names])
    header = f"{'feature (mean ± sd)':<30}" + "".join(f"{n:>{width}}" for n in names)
    lines += ["", header, "-" * len(header)]
    for feat in SCALARS:
        cells = "".join(f"{report['sets'][n][feat]['mean']:>{width - 10}.3f} ± {report['sets'][n][feat]['std']:<7.3f}"
                        for n in names)
        lines.append(f"{SCALAR_LABELS[feat]:<30}{cells}")
    for gen, dist in report["distances"].items():
        lines += ["", f"{gen} vs {ref}: overlapping area (OA, 1 = same) and KL({ref} || {gen}) in nats",
                  f"{'feature':<30}{'OA':>8}{'KL':>9}"]
        for feat, d in dist.items():
            label = SCALAR_LABELS.get(feat, feat.replace("_", " "))
            lines.append(f"{label:<30}{d['overlap']:>8.3f}{d['kl']:>9.3f}")
    return "\n".join(lines)


def plot_report(report: dict, sets: dict[str, list[dict]], png_path, dpi: int = 90) -> Path:
    """One panel per feature: the sets' kernel densities (scalars) or pooled histograms, side by side."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from dsmr.core.atomic import save_figure

    names = list(sets)
    panels = list(SCALARS) + list(HISTOGRAMS)
    cols = 4
    rows = math.ceil(len(panels) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 3.0 * rows), dpi=dpi)
    colours = plt.get_cmap("tab10")
    try:
        for ax, feat in zip(axes.flat, panels):
            if feat in SCALARS:
                all_values = [np.array([p[feat] for p in sets[n]], dtype=np.float64) for n in names]
                grid = scalar_grid(np.concatenate(all_values), np.concatenate(all_values))
                for i, (n, v) in enumerate(zip(names, all_values)):
                    ax.plot(grid, kde(v, grid), color=colours(i), label=n)
                    ax.plot(v, np.zeros_like(v), "|", color=colours(i), alpha=0.5)
                ax.set_title(SCALAR_LABELS[feat], fontsize=9)
            else:
                labels = HISTOGRAMS[feat]
                width = 0.8 / len(names)
                x = np.arange(len(labels))
                for i, n in enumerate(names):
                    ax.bar(x + (i - (len(names) - 1) / 2) * width, report["sets"][n]["histograms"][feat],
                           width=width, color=colours(i), label=n)
                ax.set_xticks(x)
                ax.set_xticklabels(labels, rotation=60 if len(labels) > 8 or feat != "pitch_class" else 0,
                                   fontsize=7)
                ax.set_title(f"{feat.replace('_', ' ')} histogram", fontsize=9)
            ax.tick_params(labelsize=7)
        for ax in list(axes.flat)[len(panels):]:
            ax.axis("off")
        axes.flat[0].legend(fontsize=7)
        return save_figure(fig, png_path)
    finally:
        plt.close(fig)


def default_set_name(path) -> str:
    return os.path.basename(os.path.normpath(str(path))) or str(path)
