"""The tokenizers: performance encoding (vocabulary, ordering, sustain, round trip, total decoding, files,
config) and the miditok adapter."""

from __future__ import annotations

import json
import math
import pickle
import random

import numpy as np
import pytest
import symusic
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from dsmr.errors import DsmrError
from dsmr.data.tokenizers.registry import make_tokenizer, tokenizer_from_config
from dsmr.data.tokenizers.miditok_bridge import MidiTokTokenizer
from dsmr.data.tokenizers.performance import PerformanceTokenizer
from dsmr.data.tokenizers.base import Tokenizer
from dsmr.data.midi import load_midi
from tests.midi_factory import clean_notes, make_score, make_track, notes, pedals, score_notes, write_midi_file

STEP = 0.01
EPS = 1e-4  # float32 seconds


def examples(n: int) -> settings:
    return settings(max_examples=n, deadline=None, suppress_health_check=[HealthCheck.too_slow])


TOK = PerformanceTokenizer()
NARROW = PerformanceTokenizer(min_pitch=21, max_pitch=108)


def names(tok, ids):
    return [tok.event_name(i) for i in ids]


def velocity_bin(velocity: int, bins: int = 32) -> int:
    """magenta's velocity binning, written out independently of the tokenizer."""
    return (max(velocity, 1) - 1) // math.ceil(127 / bins)


def decoded_steps(score: symusic.Score, bins: int = 32) -> list[tuple[int, int, int, int]]:
    return sorted((round(s / STEP), round(e / STEP), p, velocity_bin(v, bins)) for s, e, p, v in score_notes(score))


# ---- an independent reference for what the encoding keeps: magenta's sustain event loop + our rules


def reference_sustain(score: symusic.Score) -> list[tuple[float, float, int, int]]:
    """Notes after the sustain pedal, the way magenta's apply_sustain_control_changes processes events:
    at one instant pedal-down, pedal-up, note-on, note-off; a pedal never lifted holds to the piece end."""
    score = score.to("second")
    tracks = [t for t in score.tracks if not t.is_drum]
    all_notes = [(n.time, n.time + n.duration, n.pitch, n.velocity) for t in tracks for n in t.notes]
    total_time = max((e for _, e, _, _ in all_notes), default=0.0)
    out = []
    for track in tracks:
        notes_ = [[n.time, n.time + n.duration, n.pitch, n.velocity] for n in track.notes]
        events = [(c.time, 0 if c.value >= 64 else 1, None) for c in track.controls if c.number == 64]
        events += [(n[0], 2, i) for i, n in enumerate(notes_)] + [(n[1], 3, i) for i, n in enumerate(notes_)]
        events.sort(key=lambda e: (e[0], e[1]))
        sustain, active = False, set()
        for time, kind, i in events:
            if kind == 0:
                sustain = True
            elif kind == 1:
                sustain = False
                for j in [j for j in active if notes_[j][1] < time]:
                    notes_[j][1] = time  # held by the pedal until now
                    active.discard(j)
            elif kind == 2:
                active.add(i)
            elif not sustain:
                active.discard(i)
        for j in active:
            if notes_[j][1] < total_time:
                notes_[j][1] = total_time
        out += [tuple(n) for n in notes_]
    return out


def reference_steps(tok: PerformanceTokenizer, score: symusic.Score) -> list[tuple[int, int, int, int]]:
    """(onset, offset, pitch, velocity bin) in steps that a round trip must give, by the documented rules."""
    if tok.sustain:
        source = reference_sustain(score)
    else:
        source = [(n.time, n.time + n.duration, n.pitch, n.velocity)
                  for t in score.to("second").tracks if not t.is_drum for n in t.notes]
    by_pitch: dict[int, dict[int, tuple[int, int]]] = {}
    for start, end, pitch, velocity in source:
        if not tok.min_pitch <= pitch <= tok.max_pitch:
            continue
        onset = max(math.floor(start * 100 + 0.5), 0)
        offset = math.floor(end * 100 + 0.5)
        old = by_pitch.setdefault(pitch, {}).get(onset)
        if old is None or offset >= old[0]:  # one note per (pitch, onset): the longer one
            by_pitch[pitch][onset] = (offset, velocity)
    out = []
    for pitch, notes_ in by_pitch.items():
        onsets = sorted(notes_)
        for k, onset in enumerate(onsets):
            offset, velocity = notes_[onset]
            offset = max(offset, onset + 1)
            if k + 1 < len(onsets):
                offset = min(offset, onsets[k + 1])
            out.append((onset, offset, pitch, velocity_bin(velocity, tok.velocity_bins)))
    return sorted(out)


# ---- vocabulary


def test_vocabulary_sizes_and_layout():
    assert TOK.vocab_size == 3 + 388 and NARROW.vocab_size == 3 + 308
    assert (TOK.pad_id, TOK.bos_id, TOK.eos_id) == (0, 1, 2)
    vocab = TOK.vocabulary()
    assert vocab[:5] == ["PAD", "BOS", "EOS", "NOTE_ON_0", "NOTE_ON_1"]
    assert vocab[3 + 127] == "NOTE_ON_127" and vocab[3 + 128] == "NOTE_OFF_0"
    assert vocab[3 + 256] == "TIME_SHIFT_10ms" and vocab[3 + 355] == "TIME_SHIFT_1000ms"
    assert vocab[3 + 356] == "VELOCITY_BIN_0" and vocab[-1] == "VELOCITY_BIN_31"
    assert len(set(vocab)) == len(vocab)
    narrow = NARROW.vocabulary()
    assert narrow[3] == "NOTE_ON_21" and narrow[3 + 87] == "NOTE_ON_108" and narrow[3 + 88] == "NOTE_OFF_21"
    assert all(TOK.event_id(name) == i for i, name in enumerate(vocab))
    with pytest.raises(DsmrError, match="391"):
        TOK.event_name(391)
    with pytest.raises(DsmrError, match="NOTE_ON_200"):
        TOK.event_id("NOTE_ON_200")
    assert isinstance(TOK, Tokenizer)


def test_note_pitch_and_event_seconds():
    assert [TOK.note_pitch(TOK.event_id(n)) for n in ("NOTE_ON_0", "NOTE_ON_127", "NOTE_OFF_60", "BOS")] == \
        [0, 127, None, None]
    assert NARROW.note_pitch(NARROW.event_id("NOTE_ON_21")) == 21
    assert TOK.event_seconds(TOK.event_id("TIME_SHIFT_10ms")) == 0.01
    assert TOK.event_seconds(TOK.event_id("TIME_SHIFT_1000ms")) == 1.0
    assert {TOK.event_seconds(TOK.event_id(n)) for n in ("EOS", "NOTE_ON_60", "VELOCITY_BIN_3")} == {0.0}
    assert all(TOK.event_seconds(i) == TOK.seconds([i]) for i in range(TOK.vocab_size) if i != TOK.eos_id)
    with pytest.raises(DsmrError, match="391"):
        TOK.note_pitch(391)


@pytest.mark.parametrize("kwargs", [dict(min_pitch=-1), dict(max_pitch=128), dict(min_pitch=60, max_pitch=59),
                                    dict(velocity_bins=0), dict(velocity_bins=128), dict(max_shift_steps=0),
                                    dict(sustain="yes"), dict(min_pitch=1.5)])
def test_bad_parameters_are_dsmr_errors(kwargs):
    with pytest.raises(DsmrError, match="PerformanceTokenizer"):
        PerformanceTokenizer(**kwargs)


# ---- encoding: exact sequences


def test_chord_then_restrike_exact_ids():
    score = make_score([(0.5, 1.0, 64, 80), (0.5, 1.0, 60, 80), (1.0, 3.5, 60, 100)])
    assert names(TOK, TOK.encode(score)) == [
        "TIME_SHIFT_500ms", "VELOCITY_BIN_19", "NOTE_ON_60", "NOTE_ON_64",
        "TIME_SHIFT_500ms", "NOTE_OFF_60", "NOTE_OFF_64", "VELOCITY_BIN_24", "NOTE_ON_60",
        "TIME_SHIFT_1000ms", "TIME_SHIFT_1000ms", "TIME_SHIFT_500ms", "NOTE_OFF_60"]


def test_restrike_while_sounding_ends_the_old_note():
    # 62 is struck again at 0.3 s while its first note (to 1.0 s) still sounds.
    score = make_score([(0.0, 1.0, 62, 64), (0.3, 0.6, 62, 64)])
    assert names(TOK, TOK.encode(score)) == [
        "VELOCITY_BIN_15", "NOTE_ON_62", "TIME_SHIFT_300ms", "NOTE_OFF_62", "NOTE_ON_62",
        "TIME_SHIFT_300ms", "NOTE_OFF_62"]


def test_velocity_emitted_only_when_the_bin_changes():
    score = make_score([(0.0, 0.1, 60, 81), (0.1, 0.2, 61, 84), (0.2, 0.3, 62, 85), (0.3, 0.4, 63, 85)])
    assert [n for n in names(TOK, TOK.encode(score)) if n.startswith("VELOCITY")] == [
        "VELOCITY_BIN_20", "VELOCITY_BIN_21"]


def test_zero_length_and_duplicate_notes():
    # A zero-length note lasts one step; two notes of one pitch at one onset are one (the longer).
    score = make_score([(0.2, 0.2, 60, 64), (0.5, 0.6, 70, 64), (0.5, 0.9, 70, 64)])
    assert names(TOK, TOK.encode(score)) == [
        "TIME_SHIFT_200ms", "VELOCITY_BIN_15", "NOTE_ON_60", "TIME_SHIFT_10ms", "NOTE_OFF_60",
        "TIME_SHIFT_290ms", "NOTE_ON_70", "TIME_SHIFT_400ms", "NOTE_OFF_70"]


def test_pitch_range_drops_notes_outside():
    score = make_score([(0.0, 0.5, 20, 64), (0.0, 0.5, 21, 64), (0.0, 0.5, 108, 64), (0.0, 0.5, 109, 64)])
    assert names(NARROW, NARROW.encode(score)) == [
        "VELOCITY_BIN_15", "NOTE_ON_21", "NOTE_ON_108", "TIME_SHIFT_500ms", "NOTE_OFF_21", "NOTE_OFF_108"]
    assert len(TOK.encode(score)) == 10


def test_tracks_merged_and_drums_skipped():
    score = make_score(tracks=[make_track([(0.0, 0.5, 60, 64)]), make_track([(0.0, 0.5, 48, 64)], program=0),
                               make_track([(0.1, 0.2, 36, 100)], is_drum=True)])
    assert names(TOK, TOK.encode(score)) == [
        "VELOCITY_BIN_15", "NOTE_ON_48", "NOTE_ON_60", "TIME_SHIFT_500ms", "NOTE_OFF_48", "NOTE_OFF_60"]


def test_empty_score_encodes_to_nothing():
    assert TOK.encode(make_score()).size == 0
    assert TOK.encode(symusic.Score(480)).dtype == np.int64


def test_any_time_unit_gives_the_same_ids():
    score = make_score([(0.25, 0.75, 60, 90), (1.0, 2.0, 67, 30)], [(0.5, 1.5)])
    ids = TOK.encode(score)
    assert np.array_equal(TOK.encode(score.to("tick")), ids)
    assert np.array_equal(TOK.encode(score.to("quarter")), ids)


# ---- sustain


def test_pedal_extends_note_offs_until_release():
    score = make_score([(0.0, 0.5, 60, 64), (1.0, 1.2, 64, 64), (3.0, 3.5, 67, 64)], [(0.2, 2.0)])
    assert decoded_steps(TOK.decode(TOK.encode(score))) == [(0, 200, 60, 15), (100, 200, 64, 15),
                                                            (300, 350, 67, 15)]
    dry = PerformanceTokenizer(sustain=False)
    assert decoded_steps(dry.decode(dry.encode(score))) == [(0, 50, 60, 15), (100, 120, 64, 15), (300, 350, 67, 15)]


def test_pedal_edges_and_restrike_under_pedal(tmp_path):
    # Through a real MIDI file: CC64 values >= 64 press, < 64 release.
    path = write_midi_file(tmp_path / "p.mid", [(0.0, 1.0, 50, 64),   # ends at the press: sustained
                                                 (0.0, 2.0, 52, 64),   # ends at the release: not
                                                 (1.2, 1.4, 55, 64), (1.6, 1.7, 55, 64)],  # re-struck
                           controls=[(1.0, 64, 64), (1.5, 64, 100), (2.0, 64, 63)])
    assert decoded_steps(TOK.decode(TOK.encode_file(path))) == [
        (0, 200, 50, 15), (0, 200, 52, 15), (120, 160, 55, 15), (160, 200, 55, 15)]


def test_pedal_never_released_holds_to_the_end():
    score = make_score([(0.0, 0.5, 60, 64), (1.0, 4.0, 40, 64)], [(0.2, None)])
    assert decoded_steps(TOK.decode(TOK.encode(score))) == [(0, 400, 60, 15), (100, 400, 40, 15)]


# ---- round trip (property-based)


@examples(150)
@given(clean_notes(), st.sampled_from([TOK, NARROW]))
def test_round_trip_keeps_every_note_within_10ms(notes_, tok):
    score = make_score(notes_)
    by_pitch = lambda n: (n[2], n[0])  # noqa: E731 (ends may tie differently after rounding)
    expected = sorted((n for n in score_notes(score) if tok.min_pitch <= n[2] <= tok.max_pitch), key=by_pitch)
    decoded = sorted(score_notes(tok.decode(tok.encode(score))), key=by_pitch)
    assert len(decoded) == len(expected)
    for (s0, e0, p0, v0), (s1, e1, p1, v1) in zip(expected, decoded):
        assert p1 == p0
        assert abs(s1 - s0) <= STEP / 2 + EPS and abs(e1 - e0) <= STEP / 2 + EPS
        assert velocity_bin(v1) == velocity_bin(v0)


@examples(150)
@given(notes(), pedals(), st.sampled_from([TOK, NARROW, PerformanceTokenizer(sustain=False, velocity_bins=16)]))
def test_round_trip_matches_the_reference_rules(notes_, pedals_, tok):
    score = make_score(notes_, pedals_)
    ids = tok.encode(score)
    decoded = tok.decode(ids)
    assert decoded_steps(decoded, tok.velocity_bins) == reference_steps(tok, score)
    # The encoding is a fixed point: what decode gives encodes to the same ids.
    assert np.array_equal(tok.encode(decoded), ids)
    assert tok.seconds(ids) == pytest.approx(max((e for _, e, _, _ in score_notes(decoded)), default=0.0), abs=EPS)


@examples(60)
@given(notes(max_notes=20), pedals())
def test_sustained_notes_within_10ms(notes_, pedals_):
    # Every onset within half a step of the sustained source; every offset too, unless the note was
    # cut by a re-strike or was shorter than one step.
    score = make_score(notes_, pedals_)
    source = reference_sustain(score)
    decoded = score_notes(TOK.decode(TOK.encode(score)))
    for start, end, pitch, velocity in decoded:
        matches = [n for n in source if n[2] == pitch and abs(n[0] - start) <= STEP / 2 + EPS]
        assert matches, f"no source note for decoded {pitch} at {start}"
        restruck = any(n[2] == pitch and abs(n[0] - end) <= STEP / 2 + EPS for n in source)
        if not restruck and end - start > STEP + EPS:
            assert any(abs(n[1] - end) <= STEP / 2 + EPS for n in matches)


# ---- total decoding


@examples(200)
@given(st.lists(st.integers(0, TOK.vocab_size - 1), max_size=300))
def test_decode_is_total(ids):
    score = TOK.decode(ids)
    assert len(score.tracks) == 1
    for start, end, pitch, velocity in score_notes(score):
        assert start >= 0 and end - start >= STEP - EPS and 0 <= pitch <= 127 and 1 <= velocity <= 127
    assert symusic.Score.from_midi(score.dumps_midi()).note_num() == score.note_num()


def test_decode_garbage_rules():
    on, off = TOK.event_id("NOTE_ON_60"), TOK.event_id("NOTE_OFF_60")
    t100ms, t500ms = TOK.event_id("TIME_SHIFT_100ms"), TOK.event_id("TIME_SHIFT_500ms")
    # NOTE_OFF with nothing on: ignored. NOTE_ON of a sounding pitch: the old note ends there.
    assert decoded_steps(TOK.decode([off, on, t100ms, on, t100ms, off, off])) == [(0, 10, 60, 15), (10, 20, 60, 15)]
    # Struck twice at one instant: one note. A note still on at the end closes at the final time.
    assert decoded_steps(TOK.decode([on, on, t500ms])) == [(0, 50, 60, 15)]
    # On and off at one instant, or on at the very end: one step.
    assert decoded_steps(TOK.decode([t100ms, on, off])) == [(10, 11, 60, 15)]
    assert decoded_steps(TOK.decode([t100ms, on])) == [(10, 11, 60, 15)]
    # PAD and BOS are ignored; EOS stops decoding.
    assert decoded_steps(TOK.decode([1, on, 0, t100ms, off, 2, on, t500ms, off])) == [(0, 10, 60, 15)]
    assert TOK.seconds([1, t100ms, 2, t500ms]) == pytest.approx(0.1)
    assert TOK.decode([]).note_num() == 0


@pytest.mark.parametrize("bad", [[5, 391, 7], [-1], np.array([3, 400])])
def test_out_of_range_ids_name_the_id(bad):
    first = next(int(i) for i in bad if not 0 <= i < 391)
    with pytest.raises(DsmrError, match=f"token id {first} "):
        TOK.decode(bad)
    with pytest.raises(DsmrError, match=f"token id {first} "):
        TOK.seconds(bad)


# ---- files


def test_decode_to_file_writes_standard_midi(tmp_path):
    ids = TOK.encode(make_score([(0.0, 0.5, 60, 100), (0.5, 1.25, 64, 40)], [(0.2, 0.7)]))
    out = tmp_path / "out" / "piece.mid"
    TOK.decode_to_file(ids, out)
    assert [p.name for p in out.parent.iterdir()] == ["piece.mid"]  # no temporary left behind
    back = symusic.Score(out)
    assert back.ticks_per_quarter == 500 and back.tempos[0].qpm == pytest.approx(120)
    assert np.array_equal(TOK.encode(back), ids)

    import music21  # another reader: same notes, same timing (quarter notes at 120 qpm = 0.5 s)

    parsed = music21.converter.parse(str(out))
    got = sorted((float(n.offset) / 2, n.pitch.midi) for n in parsed.flatten().notes)
    assert got == [(0.0, 60), (0.5, 64)]


def test_encode_file_round_trip(tmp_path):
    path = write_midi_file(tmp_path / "a.midi", [(0.1, 0.4, 60, 70), (0.2, 0.9, 72, 20)])
    assert np.array_equal(TOK.encode_file(path), TOK.encode(load_midi(path)))
    assert names(TOK, TOK.encode_file(str(path))) == [
        "TIME_SHIFT_100ms", "VELOCITY_BIN_17", "NOTE_ON_60", "TIME_SHIFT_100ms", "VELOCITY_BIN_4", "NOTE_ON_72",
        "TIME_SHIFT_200ms", "NOTE_OFF_60", "TIME_SHIFT_500ms", "NOTE_OFF_72"]


def test_encode_file_errors_name_the_path(tmp_path):
    good = write_midi_file(tmp_path / "good.mid", [(0.0, 0.5, 60, 64), (1.0, 2.0, 62, 64)]).read_bytes()
    cases = {
        "missing.mid": None,
        "empty.mid": b"",
        "text.mid": b"this is not a MIDI file, just some text\n",
        "truncated.mid": good[: len(good) // 2],
        "no_notes.mid": symusic.Score(480).dumps_midi(),
    }
    for name, data in cases.items():
        path = tmp_path / name
        if data is not None:
            path.write_bytes(data)
        with pytest.raises(DsmrError) as err:
            TOK.encode_file(path)
        assert str(path) in str(err.value), name
    with pytest.raises(DsmrError, match="is a folder, not a regular file"):
        TOK.encode_file(tmp_path)
    # Outside the pitch range is as good as empty.
    with pytest.raises(DsmrError, match="no notes in pitch range 21-108"):
        NARROW.encode_file(write_midi_file(tmp_path / "low.mid", [(0.0, 0.5, 10, 64)]))


def test_corrupted_bytes_never_crash(tmp_path):
    good = write_midi_file(tmp_path / "g.mid", [(i * 0.1, i * 0.1 + 0.3, 40 + i, 64) for i in range(30)]).read_bytes()
    rng = random.Random(0)
    for k in range(40):
        data = bytearray(good)
        for _ in range(rng.randint(1, 8)):
            data[rng.randrange(14, len(data))] = rng.randrange(256)
        path = tmp_path / f"c{k}.mid"
        path.write_bytes(bytes(data))
        try:
            ids = TOK.encode_file(path)
        except DsmrError as err:
            assert str(path) in str(err)
        else:
            assert ids.dtype == np.int64 and ids.min() >= 3 and ids.max() < TOK.vocab_size


# ---- config


def test_config_round_trip_and_hash():
    tok = PerformanceTokenizer(min_pitch=21, max_pitch=108, velocity_bins=16, max_shift_steps=50, sustain=False)
    cfg = json.loads(json.dumps(tok.config()))
    assert cfg["kind"] == "performance"
    again = tokenizer_from_config(cfg)
    assert again == tok and again.config_hash() == tok.config_hash() and len(tok.config_hash()) == 64
    score = make_score([(0.0, 2.5, 30, 100), (0.3, 0.4, 90, 10)], [(0.1, 3.0)])
    assert np.array_equal(again.encode(score), tok.encode(score))
    hashes = {PerformanceTokenizer(**kw).config_hash() for kw in
              [{}, dict(min_pitch=21), dict(max_pitch=108), dict(velocity_bins=16), dict(max_shift_steps=50),
               dict(sustain=False)]}
    assert len(hashes) == 6
    assert make_tokenizer("performance", min_pitch=21, max_pitch=108) == NARROW
    # The cache sends tokenizers to worker processes.
    assert np.array_equal(pickle.loads(pickle.dumps(tok)).encode(score), tok.encode(score))


@pytest.mark.parametrize("cfg, match", [
    ({}, "kind"), ({"kind": "nope"}, "unknown tokenizer kind"),
    ({"kind": "performance", "min_pitch": 200}, "min_pitch"),
    ({"kind": "performance", "bogus": 1}, "bogus"),
    ({"kind": "performance", "version": 99}, "version 99"),
    ({"kind": "miditok"}, "params"),
    ({"kind": "miditok", "params": {"tokenization": "REMI", "config": {"bogus": 1}}}, "bad miditok REMI params"),
])
def test_bad_configs(cfg, match):
    with pytest.raises(DsmrError, match=match):
        tokenizer_from_config(cfg)


def test_make_tokenizer_unknown_name():
    with pytest.raises(DsmrError, match="unknown tokenizer 'nope'"):
        make_tokenizer("nope")
    with pytest.raises(DsmrError, match="bad option"):
        make_tokenizer("performance", pitch=3)


# ---- real MAESTRO files


@pytest.mark.maestro
def test_maestro_round_trip(maestro_root):
    paths = sorted(maestro_root.glob("20*/*.midi"), key=lambda p: p.stat().st_size)
    for path in [paths[0], paths[len(paths) // 2], paths[-1]]:  # smallest, median, largest
        score = load_midi(path)
        ids = TOK.encode_file(path)
        decoded = TOK.decode(ids)
        assert decoded_steps(decoded) == reference_steps(TOK, score), path
        assert np.array_equal(TOK.encode(decoded), ids)
        # Every sustained source note is there: pitch exact, onset within 10 ms.
        onsets = {(round(s / STEP), p) for s, _, p, _ in score_notes(decoded)}
        assert all((math.floor(s * 100 + 0.5), p) in onsets for s, _, p, _ in reference_sustain(score))
        assert TOK.seconds(ids) == pytest.approx(decoded.end(), abs=1e-3)  # float32 seconds


# ---- miditok adapter


@pytest.fixture(scope="module", params=["remi", "tsd"])
def miditok_tok(request):
    return make_tokenizer(request.param)


def test_miditok_round_trip(miditok_tok):
    tok = miditok_tok
    assert isinstance(tok, MidiTokTokenizer) and isinstance(tok, Tokenizer)
    assert len({tok.pad_id, tok.bos_id, tok.eos_id}) == 3
    assert [tok.event_name(i) for i in (tok.pad_id, tok.bos_id, tok.eos_id)] == ["PAD_None", "BOS_None", "EOS_None"]
    score = make_score(tracks=[make_track([(0.0, 0.5, 60, 80), (0.5, 1.0, 64, 80), (1.0, 2.0, 67, 100)]),
                               make_track([(0.0, 2.0, 48, 60)], program=0),
                               make_track([(0.0, 0.1, 36, 100)], is_drum=True)])
    ids = tok.encode(score)
    assert ids.dtype == np.int64 and ids.ndim == 1 and ids.min() >= 0 and ids.max() < tok.vocab_size
    assert not {tok.pad_id, tok.bos_id, tok.eos_id} & set(ids.tolist())
    decoded = tok.decode(np.concatenate([[tok.bos_id], ids, [tok.eos_id, *ids[:5]]]))
    assert sorted(p for _, _, p, _ in score_notes(decoded)) == [48, 60, 64, 67]
    assert tok.seconds(ids) == pytest.approx(2.0, abs=0.05)
    assert tok.vocabulary()[tok.event_id("Pitch_60")] == "Pitch_60"
    assert tok.note_pitch(tok.event_id("Pitch_60")) == 60 and tok.note_pitch(tok.bos_id) is None
    assert tok.event_seconds(ids[0]) is None  # time depends on the tempo and the events around


def test_miditok_sustain(miditok_tok):
    score = make_score([(0.0, 0.25, 60, 80)], [(0.1, 1.5)])
    held = make_tokenizer(type(miditok_tok.miditok).__name__.lower())
    dry = make_tokenizer(type(miditok_tok.miditok).__name__.lower(), sustain=False)
    assert score_notes(held.decode(held.encode(score)))[0][1] == pytest.approx(1.5, abs=0.07)
    assert score_notes(dry.decode(dry.encode(score)))[0][1] == pytest.approx(0.25, abs=0.07)
    assert held.config_hash() != dry.config_hash()


def test_miditok_config_round_trip(miditok_tok, tmp_path):
    tok = miditok_tok
    cfg = json.loads(json.dumps(tok.config()))
    again = tokenizer_from_config(cfg)
    assert again.config_hash() == tok.config_hash() and again.vocabulary() == tok.vocabulary()
    path = write_midi_file(tmp_path / "m.mid", [(0.0, 0.5, 60, 80), (0.25, 1.5, 72, 40)])
    assert np.array_equal(again.encode_file(path), tok.encode_file(path))
    assert np.array_equal(pickle.loads(pickle.dumps(tok)).encode_file(path), tok.encode_file(path))
    out = tmp_path / "back.mid"
    again.decode_to_file(again.encode_file(path), out)
    assert symusic.Score(out).note_num() == 2


def test_miditok_configs_differ():
    assert make_tokenizer("remi").config_hash() != make_tokenizer("tsd").config_hash()
    assert make_tokenizer("remi").config_hash() != make_tokenizer("remi", num_velocities=16).config_hash()


@examples(25)
@given(data=st.data())
def test_miditok_decode_is_total(miditok_tok, data):
    tok = miditok_tok
    ids = data.draw(st.lists(st.integers(0, tok.vocab_size - 1), max_size=200))
    score = tok.decode(ids)
    assert isinstance(score.note_num(), int)
    with pytest.raises(DsmrError, match=f"token id {tok.vocab_size}"):
        tok.decode([*ids, tok.vocab_size])


def test_miditok_rejects_unusable_tokenizers(tmp_path):
    import miditok

    with pytest.raises(DsmrError, match="several vocabularies"):
        make_tokenizer("cpword")
    with pytest.raises(DsmrError, match="special tokens"):
        MidiTokTokenizer(miditok.REMI(miditok.TokenizerConfig(special_tokens=["PAD"])))
    with pytest.raises(DsmrError, match="cannot build miditok MMM"):
        make_tokenizer("mmm")  # needs a base tokenizer in its options
    with pytest.raises(DsmrError, match="not_an_option"):
        make_tokenizer("remi", not_an_option=1)
    with pytest.raises(DsmrError) as err:
        make_tokenizer("tsd").encode_file(tmp_path / "absent.mid")
    assert "absent.mid" in str(err.value)


def test_miditok_trained_tokenizer(tmp_path):
    rng = np.random.default_rng(0)
    paths = [write_midi_file(tmp_path / f"t{k}.mid", [(i * 0.25, i * 0.25 + 0.5, int(p), 80) for i, p in
                                                       enumerate(rng.integers(48, 72, 60))]) for k in range(3)]
    base = make_tokenizer("remi")
    base.miditok.train(vocab_size=base.vocab_size + 40, files_paths=paths)
    tok = MidiTokTokenizer(base.miditok)
    assert tok.vocab_size == base.vocab_size + 40
    ids = tok.encode_file(paths[0])
    assert ids.max() >= base.vocab_size  # learned merges are used
    assert any("+" in name for name in tok.vocabulary())
    assert tok.event_id(tok.event_name(int(ids.max()))) == ids.max()
    assert tok.decode(ids).note_num() == 60
    again = tokenizer_from_config(json.loads(json.dumps(tok.config())))
    assert np.array_equal(again.encode_file(paths[0]), ids) and again.config_hash() == tok.config_hash()


def test_a_velocity_decodes_to_the_middle_of_its_bin():
    """magenta's binning: bin b holds velocities 1 + b*size .. (b+1)*size and decodes to 1 + b*size + size//2
    (clipped to 127), so a round trip keeps the bin and lands in its middle, not at its edge."""
    from dsmr.data.tokenizers.performance import PerformanceTokenizer
    from tests.midi_factory import make_score

    for bins in (32, 8):
        tok = PerformanceTokenizer(velocity_bins=bins)
        size = tok.velocity_bin_size
        for velocity in (1, 2, 33, 64, 80, 100, 126, 127):
            score = tok.decode(tok.encode(make_score([(0.0, 0.5, 60, velocity)])))
            b = (velocity - 1) // size
            assert score.tracks[0].notes[0].velocity == min(1 + b * size + size // 2, 127), (bins, velocity)
