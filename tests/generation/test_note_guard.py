"""The note guard: no note hangs past its limit, no re-struck sounding pitch, no release of a silent one."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from dsmr.errors import DsmrError
from dsmr.generation import SamplingConfig, generate_batch
from dsmr.evaluation.music_stats import note_arrays
from dsmr.model import DSMR, DSMRConfig
from dsmr.generation.note_guard import LengthGuard, NoteGuard, guard_for, make_guard
from dsmr.data.tokenizers.registry import make_tokenizer

TOK = make_tokenizer("performance")
ON, OFF = TOK.note_on_base, TOK.note_off_base


def shift(seconds: float) -> int:
    return TOK.time_shift_base + round(seconds * 100) - 1


def test_a_silent_pitch_cannot_be_released_and_a_sounding_one_may_be_struck_again():
    guard = NoteGuard(TOK, num_lanes=2, max_note_seconds=None, max_polyphony=None)
    guard.update(torch.tensor([ON + 60, ON + 61]))
    ban = guard.banned()
    assert not ban[0, OFF + 60] and ban[0, OFF + 61] and ban[1, OFF + 60] and not ban[1, OFF + 61]
    assert not ban[:, ON:OFF].any(), "a re-struck pitch ends its old note: allowed"
    guard.update(torch.tensor([OFF + 60, shift(1.0)]))
    ban = guard.banned()
    assert ban[0, OFF + 60] and not ban[0, ON + 60]
    assert not ban[:, shift(1.0)].any(), "no length limit: any shift"
    guard.update(torch.tensor([ON + 62, ON + 61]))  # lane 1 strikes 61 again: still one note sounding
    assert not guard.banned()[1, OFF + 61] and int((~np.isnan(guard.onset[1])).sum()) == 1


def test_a_note_at_its_limit_must_end_before_time_moves_on():
    guard = NoteGuard(TOK, num_lanes=1, max_note_seconds=0.5)
    guard.feed([ON + 60, shift(0.3), ON + 64])
    ban = guard.banned()[0]
    assert not ban[shift(0.2)] and ban[shift(0.21)], "a shift may take the oldest note to its limit, not past"
    guard.update(torch.tensor([shift(0.2)]))
    ban = guard.banned()[0]
    allowed = torch.nonzero(~ban).flatten().tolist()
    assert allowed == [OFF + 60], "only the note at its limit may come next"
    guard.update(torch.tensor([OFF + 60]))
    ban = guard.banned()[0]
    assert not ban[shift(0.3)] and ban[shift(0.31)], "now the note of 0.2 s is the oldest"


def test_at_the_polyphony_limit_no_note_starts_and_nothing_prepares_one():
    guard = NoteGuard(TOK, num_lanes=1, max_polyphony=2)
    guard.feed([ON + 60, shift(0.1), ON + 62])
    ban = guard.banned()[0]
    assert ban[ON:OFF].all() and ban[TOK.velocity_base:].all(), "no note-on, no velocity"
    assert not ban[OFF + 60] and not ban[OFF + 62] and not ban[shift(1.0)] and not ban[TOK.eos_id]
    guard.update(torch.tensor([OFF + 60]))
    assert not guard.banned()[0, ON:OFF].any() and not guard.banned()[0, TOK.velocity_base:].any()


def test_encodings_without_note_offs_are_refused():
    class NoOffs:
        vocab_size = 10

        def note_pitch(self, i):
            return 60 if i == 3 else None

        def event_seconds(self, i):
            return 0.0

    with pytest.raises(DsmrError, match="NOTE_OFF"):
        NoteGuard(NoOffs(), 1, max_note_seconds=1.0)
    with pytest.raises(DsmrError, match="max_note_seconds"):
        SamplingConfig(max_note_seconds=0.0).validate()
    with pytest.raises(DsmrError, match="max_polyphony"):
        SamplingConfig(max_polyphony=0).validate()


def longest_note_and_polyphony(ids) -> tuple[float, int]:
    """The longest decoded note, and the most notes sounding at once in the event stream."""
    notes = note_arrays(TOK.decode(ids))
    sounding, most = set(), 0
    for t in ids.tolist():
        if ON <= t < OFF:
            sounding.add(t - ON)
        elif OFF <= t < TOK.time_shift_base:
            sounding.discard(t - OFF)
        most = max(most, len(sounding))
    return float((notes["end"] - notes["start"]).max()), most


def test_generated_music_keeps_the_limits_that_an_unguarded_model_breaks():
    torch.manual_seed(3)
    model = DSMR(DSMRConfig(vocab_size=TOK.vocab_size, n_layers=2, d_model=32, n_heads=2, horizons=(16, 4))).eval()
    plain = SamplingConfig(seed=5, max_tokens=600, stop_at_eos=False)
    guarded = SamplingConfig(seed=5, max_tokens=600, stop_at_eos=False, max_note_seconds=1.0, max_polyphony=6)
    free = generate_batch(model, TOK, 8, sampling=plain, num_samples=2, progress=False)
    kept = generate_batch(model, TOK, 8, sampling=guarded, num_samples=2, progress=False)
    # an untrained model holds notes for many seconds and piles them up: the limits below are not vacuous
    assert max(longest_note_and_polyphony(r.ids)[0] for r in free) > 2.0
    assert max(longest_note_and_polyphony(r.ids)[1] for r in free) > 6
    for r in kept:
        longest, polyphony = longest_note_and_polyphony(r.ids)
        assert longest <= 1.0 + 1e-6 and polyphony <= 6
        sounding = set()
        for t in r.ids.tolist():  # the events themselves: no release of a silent pitch
            if ON <= t < OFF:
                sounding.add(t - ON)
            elif OFF <= t < TOK.time_shift_base:
                assert t - OFF in sounding
                sounding.discard(t - OFF)


def test_a_sample_with_no_new_notes_says_so():
    torch.manual_seed(3)
    model = DSMR(DSMRConfig(vocab_size=TOK.vocab_size, n_layers=1, d_model=16, n_heads=2, horizons=(8,))).eval()
    silent = SamplingConfig(seed=1, max_tokens=50, stop_at_eos=False, banned_ids=tuple(range(ON, OFF)))
    result = generate_batch(model, TOK, 8, sampling=silent, progress=False)[0]
    assert result.new_notes == 0 and "no new notes" in result.warning and result.summary()["warning"]
    playing = generate_batch(model, TOK, 8, sampling=SamplingConfig(seed=1, max_tokens=400, stop_at_eos=False),
                             progress=False)[0]
    assert playing.new_notes > 0 and playing.warning is None


DUR = make_tokenizer("duration")


def length_ids(name: str) -> int:
    return DUR.event_id(name)


def test_the_length_guard_bans_only_lengths_that_would_carry_the_note_past_its_limit():
    guard = LengthGuard(DUR, num_lanes=2, max_note_seconds=2.5)
    assert not guard.banned().any(), "no note being written: nothing to ban"
    note, two, one, three = (length_ids(n) for n in ("NOTE_60", "LENGTH_SECONDS_2", "LENGTH_SECONDS_1",
                                                      "LENGTH_SECONDS_3"))
    guard.update(np.array([note, note]))
    ban = guard.banned()
    assert not ban[0, two] and ban[0, three], "2 s + the shortest completion fits, 3 s does not"
    assert not ban[0, length_ids("LENGTH_1000ms")] and not ban[0, length_ids("TIME_SHIFT_1000ms")]
    guard.update(np.array([two, length_ids("LENGTH_500ms")]))  # lane 1's note is complete
    ban = guard.banned()
    assert ban[0, one] and not ban[0, length_ids("LENGTH_500ms")] and ban[0, length_ids("LENGTH_510ms")]
    assert not ban[1].any()
    with pytest.raises(DsmrError, match="max_polyphony"):
        make_guard(DUR, 1, max_note_seconds=2.0, max_polyphony=4)
    with pytest.raises(DsmrError, match="NOTE_OFF"):
        guard_for(DUR, max_polyphony=4)


def test_duration_models_get_the_longest_note_limit_by_default_and_keep_it():
    from dsmr.generation import defaults
    assert guard_for(DUR) == {"max_note_seconds": defaults.MAX_NOTE_SECONDS_LENGTHS_AT_ONSET, "max_polyphony": None}
    assert guard_for(DUR, max_note_seconds=0) == {"max_note_seconds": None, "max_polyphony": None}
    torch.manual_seed(3)
    model = DSMR(DSMRConfig(vocab_size=DUR.vocab_size, n_layers=2, d_model=32, n_heads=2, horizons=(16, 4))).eval()
    plain = SamplingConfig(seed=5, max_tokens=600, stop_at_eos=False)
    capped = SamplingConfig(seed=5, max_tokens=600, stop_at_eos=False, max_note_seconds=1.5)

    def longest(result) -> float:
        notes = note_arrays(DUR.decode(result.ids))
        return float((notes["end"] - notes["start"]).max())

    # an untrained model draws whole seconds of length freely: the limit below is not vacuous
    assert max(longest(r) for r in generate_batch(model, DUR, 8, sampling=plain, num_samples=2, progress=False)) > 3
    for r in generate_batch(model, DUR, 8, sampling=capped, num_samples=2, progress=False):
        assert r.new_notes > 20 and longest(r) <= 1.5 + 1e-6
