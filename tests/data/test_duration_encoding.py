"""The duration encoding: exact round trip at 10 ms (the performance encoding's notes), lengths of any size,
a total decoder, and no note-off events for a note to hang on."""

from __future__ import annotations

import numpy as np
import pytest

from dsmr.data.tokenizers.duration import DurationTokenizer
from dsmr.errors import DsmrError
from dsmr.evaluation.music_stats import note_arrays
from dsmr.data.tokenizers.performance import PerformanceTokenizer
from dsmr.data.tokenizers.registry import make_tokenizer, tokenizer_from_config
from tests.midi_factory import make_score

DUR = make_tokenizer("duration")
PERF = make_tokenizer("performance")


def notes(score):
    a = note_arrays(score)
    return sorted(zip(np.round(a["start"], 3), np.round(a["end"], 3), a["pitch"].tolist(), a["velocity"].tolist()))


NOTES = [(0.0, 0.5, 60, 80), (0.0, 0.5, 64, 80), (0.5, 13.27, 67, 70), (1.5, 3.0, 72, 100), (3.2, 3.21, 55, 60),
         (3.2, 3.6, 60, 61), (3.3, 4.0, 60, 20), (40.0, 40.004, 30, 127)]


def test_round_trip_gives_the_performance_encodings_notes():
    score = make_score(NOTES)
    ids = DUR.encode(score)
    assert notes(DUR.decode(ids)) == notes(PERF.decode(PERF.encode(score)))
    assert np.array_equal(DUR.encode(DUR.decode(ids)), ids), "decode then encode is the identity on its ids"
    # a 12.77 s note: 12 whole seconds (10 + 2) then 77 steps; at most 10 whole seconds per id
    names = [DUR.event_name(i) for i in ids]
    at = names.index("NOTE_67")
    assert names[at + 1:at + 4] == ["LENGTH_SECONDS_10", "LENGTH_SECONDS_2", "LENGTH_770ms"]


def test_maestro_files_round_trip_like_the_performance_encoding(maestro_root):
    import symusic

    files = sorted(maestro_root.glob("2004/*.mid*"))[:3]
    for path in files:
        score = symusic.Score(str(path))
        ids = DUR.encode(score)
        assert notes(DUR.decode(ids)) == notes(PERF.decode(PERF.encode(score))), path
        assert len(ids) < 1.3 * len(PERF.encode(score)), "a few more ids than the performance encoding"


def test_decode_is_total_and_the_vocabulary_has_no_note_offs():
    rng = np.random.default_rng(0)
    for _ in range(20):
        score = DUR.decode(rng.integers(0, DUR.vocab_size, size=300))
        a = note_arrays(score)
        assert (a["end"] > a["start"]).all()
    assert all(DUR.note_off_pitch(i) is None for i in range(DUR.vocab_size))
    assert [DUR.note_pitch(i) for i in range(DUR.vocab_size)].count(None) == DUR.vocab_size - 128
    # a NOTE whose length never came lasts one step; a LENGTH with no NOTE is ignored
    n60, length_500 = DUR.event_id("NOTE_60"), DUR.event_id("LENGTH_500ms")
    shift = DUR.event_id("TIME_SHIFT_1000ms")
    assert notes(DUR.decode([length_500, n60, shift, n60, length_500])) == [(0.0, 0.01, 60, 64), (1.0, 1.5, 60, 64)]
    assert DUR.seconds([n60, shift, n60, length_500]) == 1.0


def test_config_round_trips_and_bad_options_are_refused():
    other = make_tokenizer("duration", max_length_seconds=4, velocity_bins=16)
    again = tokenizer_from_config(other.config())
    assert isinstance(again, DurationTokenizer) and again == other and again.vocab_size == other.vocab_size
    assert other.config_hash() != DUR.config_hash() != PERF.config_hash()
    with pytest.raises(DsmrError, match="max_length_seconds"):
        DurationTokenizer(max_length_seconds=0)
    with pytest.raises(DsmrError, match="version"):
        tokenizer_from_config(dict(DUR.config(), version=99))


@pytest.mark.parametrize("tokenizer", [DurationTokenizer(), PerformanceTokenizer()], ids=["duration", "performance"])
def test_a_prompt_ends_at_the_second_asked_for(tokenizer, tmp_path):
    """The silence between a prompt's last onset and its cut belongs to the prompt: a continuation starts at
    the asked second, not at the last onset (in the duration encoding the clock moves from onset to onset)."""
    from dsmr.generation import load_prompt
    from tests.midi_factory import write_midi_file

    path = write_midi_file(tmp_path / "p.mid", [(0.0, 1.0, 60, 80), (8.7, 9.0, 64, 80), (12.0, 13.0, 67, 80)])
    ids = load_prompt(path, tokenizer, seconds=10)
    assert tokenizer.seconds(ids) == pytest.approx(10.0)
    assert [n.pitch for n in tokenizer.decode(ids).tracks[0].notes] == [60, 64]
    short = write_midi_file(tmp_path / "short.mid", [(0.0, 1.0, 60, 80), (4.0, 5.0, 62, 80)])
    assert tokenizer.seconds(load_prompt(short, tokenizer, seconds=10)) == pytest.approx(
        tokenizer.seconds(load_prompt(short, tokenizer)))  # a piece shorter than the cut keeps its own end
