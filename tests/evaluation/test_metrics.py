"""Music statistics (dsmr.evaluation.music_stats) and `dsmr metrics`: features checked by hand, OA/KL limits, the CLI."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from dsmr.cli import main
from dsmr.errors import DsmrError
from dsmr.evaluation.music_stats import compare_sets, crop, kde, overlap_and_kl, piece_features, set_summary
from tests.midi_factory import make_score, make_track, write_midi_file

# a C major chord for 1 s, then C5 alone for 1 s
CHORD = [(0.0, 1.0, 60, 100), (0.0, 1.0, 64, 80), (0.0, 1.0, 67, 60), (1.0, 2.0, 72, 40)]


def test_piece_features_by_hand():
    f = piece_features(make_score(CHORD))
    assert f["notes"] == 4 and f["seconds"] == pytest.approx(2.0)
    assert f["pitch_class_entropy"] == pytest.approx(1.5)  # C twice, E and G once: 1/2, 1/4, 1/4
    assert (f["pitch_range"], f["used_pitches"]) == (12, 4)
    assert f["polyphony"] == pytest.approx(2.0, abs=0.02)  # 3 notes for 1 s, then 1 for 1 s
    assert f["note_density"] == pytest.approx(2.0)
    assert f["mean_ioi"] == pytest.approx(1.0)  # the chord is one onset
    assert f["mean_velocity"] == pytest.approx(70.0)
    h = f["histograms"]
    assert h["pitch_class"][0] == 2 and h["pitch_class"][4] == h["pitch_class"][7] == 1 and sum(h["pitch_class"]) == 4
    assert sum(h["duration"]) == 4 and h["duration"][6] == 4  # all notes 1 s: the .8-1.6 s bin
    assert sum(h["ioi"]) == 1 and h["ioi"][6] == 1
    assert h["velocity"][100 // 16] == 1 and h["velocity"][40 // 16] == 1


def test_drums_are_ignored_and_empty_piece_refused():
    drums = make_track([(0.0, 0.1, 36, 100)] * 3, is_drum=True, name="drums")
    f = piece_features(make_score(CHORD, tracks=[drums]))
    assert f["notes"] == 4
    with pytest.raises(DsmrError, match="no notes"):
        piece_features(make_score([]))
    with pytest.raises(DsmrError, match="no notes"):
        piece_features(make_score(tracks=[drums]))


def test_crop_keeps_notes_starting_before():
    assert piece_features(crop(make_score(CHORD), 0.5))["notes"] == 3
    assert crop(make_score(CHORD), None).tracks[0].notes.__len__() == 4


def test_overlap_and_kl_limits():
    grid = np.linspace(-10, 10, 801)
    dx = float(grid[1] - grid[0])
    a = kde(np.array([0.0, 0.5, -0.3, 0.2]), grid)
    assert np.sum(a) * dx == pytest.approx(1.0, abs=1e-3)
    oa, kl = overlap_and_kl(a, a, dx)
    assert oa == pytest.approx(1.0, abs=1e-6) and kl == pytest.approx(0.0, abs=1e-9)
    far = kde(np.array([8.0, 8.5, 7.9]), grid)
    oa, kl = overlap_and_kl(a, far, dx)
    assert oa < 0.01 and 5 < kl < 100 and math.isfinite(kl)
    oa, kl = overlap_and_kl(np.array([1.0, 0, 0]), np.array([0, 0, 1.0]))
    assert oa < 1e-5 and math.isfinite(kl) and kl > 10
    assert overlap_and_kl(np.array([2.0, 2.0]), np.array([1.0, 1.0]))[0] == pytest.approx(1.0)
    assert kde(np.array([3.0, 3.0, 3.0]), grid).max() > 0  # constant data still has a density


def test_compare_sets_same_vs_different():
    rng = np.random.default_rng(0)

    def piece(shift, rate):
        notes, t = [], 0.0
        for _ in range(30):
            notes.append((t, t + 0.3, int(60 + shift + rng.integers(0, 7)), int(rng.integers(50, 90))))
            t += rate
        return piece_features(make_score(notes))

    ref = [piece(0, 0.25) for _ in range(12)]
    same = [piece(0, 0.25) for _ in range(12)]
    other = [piece(6, 1.0) for _ in range(12)]
    close, far = compare_sets(same, ref), compare_sets(other, ref)
    assert set(close) == set(far) and "pitch_class_histogram" in close and "note_density" in close
    assert close["pitch_class_histogram"]["overlap"] > 0.8 > far["pitch_class_histogram"]["overlap"]
    assert close["note_density"]["overlap"] > 0.5 > far["note_density"]["overlap"]
    assert far["note_density"]["kl"] > close["note_density"]["kl"]
    summary = set_summary(ref)
    assert summary["pieces"] == 12 and summary["note_density"]["mean"] == pytest.approx(30 / (29 * 0.25 + 0.3))
    assert sum(summary["histograms"]["pitch_class"]) == pytest.approx(1.0)


def test_cli_metrics_generated_vs_reference(bach_cache, tmp_path, capsys):
    gen = tmp_path / "gen"
    gen.mkdir()
    tok = bach_cache.tokenizer
    for i in range(3):  # "generated": pieces of the train split, written as MIDI files
        tok.decode_to_file(bach_cache.piece("train", i), gen / f"s{i}.mid")
    (gen / "empty.mid").write_bytes(b"")  # skipped with a reason, not fatal
    png = tmp_path / "m.png"
    assert main(["metrics", str(gen), "--reference", str(bach_cache.path), "--split", "test", "--max-pieces", "4",
                 "--plot", str(png), "--json", "--no-progress"]) == 0
    captured = capsys.readouterr()
    report = json.loads(captured.out)
    ref = f"{bach_cache.path.name}:test"
    assert report["reference"] == ref and set(report["sets"]) == {"gen", ref}
    assert report["sets"]["gen"]["pieces"] == 3 and report["sets"][ref]["pieces"] == min(4, bach_cache.num_pieces("test"))
    for d in report["distances"]["gen"].values():
        assert 0.0 <= d["overlap"] <= 1.0 + 1e-9 and d["kl"] >= -1e-9
    assert len(report["pieces"]["gen"]) == 3 and "empty.mid" in captured.err
    assert png.stat().st_size > 10_000

    # the yardstick: a cache's train split against its test split, as a table
    assert main(["metrics", str(bach_cache.path), "--reference", str(bach_cache.path), "--max-pieces", "4",
                 "--crop-seconds", "20", "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert f"{bach_cache.path.name}:train vs {ref}" in out and "pitch-class entropy" in out and "OA" in out


def test_cli_metrics_bad_input(bach_cache, tmp_path, capsys):
    junk = tmp_path / "junk.mid"
    junk.write_text("not midi")
    assert main(["metrics", str(junk), "--reference", str(bach_cache.path)]) == 2
    err = capsys.readouterr().err
    assert "no piece with notes" in err and "not a readable MIDI" in err
    assert main(["metrics", str(tmp_path / "missing"), "--reference", str(bach_cache.path)]) == 2
    assert "not found" in capsys.readouterr().err
    good = write_midi_file(tmp_path / "g.mid", CHORD)
    assert main(["metrics", str(good), "--reference", str(bach_cache.path), "--split", "nope"]) == 2
    assert "no split 'nope'" in capsys.readouterr().err


def test_small_sets_and_uncropped_sets_of_other_lengths_are_warned_about():
    from dsmr.cli.metrics import set_warnings

    short = [{"seconds": 30.0}] * 3
    long = [{"seconds": 400.0}] * 40
    warnings = set_warnings({"generated": short, "test": long}, crop_seconds=None)
    assert any("only 3 piece(s)" in w for w in warnings) and any("--crop-seconds" in w for w in warnings)
    assert set_warnings({"generated": [{"seconds": 30.0}] * 30, "test": long}, crop_seconds=30.0) == []


def test_keys_and_pitch_class_profiles_of_known_music():
    from dsmr.evaluation.harmony import (estimate_key, key_name, key_relation, pitch_class_profile, profile_similarity)

    def profile(pitches, lengths=None):
        pitches = np.array(pitches)
        start = np.arange(len(pitches), dtype=float)
        return pitch_class_profile(pitches, start, start + (np.ones(len(pitches)) if lengths is None else lengths))

    c_major = profile([60, 62, 64, 65, 67, 69, 71, 72, 64, 67, 60, 67], )
    a_minor = profile([57, 59, 60, 62, 64, 65, 68, 69, 57, 60, 64, 57, 64])  # harmonic minor: G#
    assert key_name(estimate_key(c_major)) == "C major"
    assert key_name(estimate_key(a_minor)) == "A minor"
    assert key_name(estimate_key(profile([p + 6 for p in [60, 62, 64, 65, 67, 69, 71, 72, 64, 67, 60, 67]]))) == "F# major"
    # lengths count: a long G and D over a short C make G's tonality
    assert estimate_key(profile([67, 71, 74, 60], [8, 4, 6, 0.5]))[0] == 7
    assert profile_similarity(c_major, c_major) == pytest.approx(1.0)
    far = profile([p + 6 for p in [60, 62, 64, 65, 67, 69, 71, 72]])
    assert profile_similarity(c_major, far) < profile_similarity(c_major, profile([67, 69, 71, 72, 74, 76, 78, 79])) < 1
    assert profile_similarity(c_major, np.zeros(12)) == 0.0
    C, G, F, Am, Em, Dm, D, Fs = (0, "major"), (7, "major"), (5, "major"), (9, "minor"), (4, "minor"), (2, "minor"), \
        (2, "major"), (6, "major")
    assert key_relation(C, C) == "same"
    assert all(key_relation(C, k) == "close" for k in (G, F, Am, Em, Dm))
    assert key_relation(C, D) == "far" and key_relation(C, Fs) == "far" and key_relation(Fs, C) == "far"
    assert key_relation((11, "major"), (6, "major")) == "close"  # B and F#: across the circle's wrap
