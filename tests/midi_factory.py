"""Build symusic Scores for tests: from note tuples in seconds, with sustain pedal, and random ones.

A note is (start, end, pitch, velocity) in seconds; a pedal is (press, release) in seconds, release None
for a pedal never lifted. Pedals become CC64 events (127 down, 0 up) on the track, as in MIDI files.
Random times are on a 1 ms grid so that float32 seconds stay exact enough to reason about.
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterable, Sequence

import symusic
from hypothesis import strategies as st

Note = tuple[float, float, int, int]
Pedal = tuple[float, "float | None"]


def make_track(notes: Iterable[Note], pedals: Iterable[Pedal] = (), *, controls: Iterable[tuple[float, int, int]] = (),
               name: str = "Piano", program: int = 0, is_drum: bool = False) -> symusic.Track:
    """A track in seconds. `controls` adds raw (time, number, value) control changes."""
    track = symusic.Track(name, program=program, is_drum=is_drum, ttype="second")
    for start, end, pitch, velocity in notes:
        track.notes.append(symusic.Note(start, end - start, pitch, velocity, ttype="second"))
    events = [(t, 64, v) for press, release in pedals
              for t, v in ((press, 127), (release, 0)) if t is not None]
    for time, number, value in sorted([*events, *controls], key=lambda e: e[0]):
        track.controls.append(symusic.ControlChange(time, number, value, ttype="second"))
    track.notes.sort()
    return track


def make_score(notes: Iterable[Note] = (), pedals: Iterable[Pedal] = (), *,
               controls: Iterable[tuple[float, int, int]] = (), tracks: Sequence[symusic.Track] = (),
               tpq: int = 480) -> symusic.Score:
    """A Score in seconds with one track of `notes`/`pedals`/`controls` (when given) plus any `tracks`."""
    score = symusic.Score(tpq, ttype="second")
    notes, pedals, controls = list(notes), list(pedals), list(controls)
    if notes or pedals or controls or not tracks:
        score.tracks.append(make_track(notes, pedals, controls=controls))
    for track in tracks:
        score.tracks.append(track)
    return score


def write_midi_file(path: str | Path, notes: Iterable[Note] = (), pedals: Iterable[Pedal] = (), **kw) -> Path:
    """Write a MIDI file of `notes`/`pedals` (test helper: a plain write, not atomic)."""
    path = Path(path)
    make_score(notes, pedals, **kw).dump_midi(path)
    return path


def tiny_midi(path: str | Path, pitch: int = 60, n: int = 4) -> Path:
    """A small one-track MIDI file of n quarter-second notes from `pitch` (another pitch: other content)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    return write_midi_file(path, [(i * 0.5, i * 0.5 + 0.4, pitch + i % 3, 80) for i in range(n)])


def score_notes(score: symusic.Score) -> list[Note]:
    """All notes of a Score as (start, end, pitch, velocity) in seconds, sorted."""
    out = []
    for track in score.to("second").tracks:
        out += [(n.time, n.time + n.duration, n.pitch, n.velocity) for n in track.notes]
    return sorted(out)


# ---- hypothesis strategies

ms = st.integers(min_value=0, max_value=20_000)  # a time in ms within 20 s


@st.composite
def notes(draw, min_pitch: int = 0, max_pitch: int = 127, max_notes: int = 40) -> list[Note]:
    """Any notes: overlaps, duplicates, zero-length notes, re-strikes of a sounding pitch."""
    raw = draw(st.lists(st.tuples(ms, st.integers(0, 3000), st.integers(min_pitch, max_pitch),
                                  st.integers(1, 127)), max_size=max_notes))
    return [(s / 1000, (s + d) / 1000, p, v) for s, d, p, v in raw]


@st.composite
def clean_notes(draw, min_pitch: int = 0, max_pitch: int = 127, max_notes: int = 40) -> list[Note]:
    """Notes a round trip must keep within 10 ms: per pitch, no overlap; every note lasts >= 11 ms."""
    pitches = draw(st.lists(st.integers(min_pitch, max_pitch), min_size=1, max_size=8, unique=True))
    out: list[Note] = []
    for pitch in pitches:
        now = draw(st.integers(0, 5000))
        for gap, dur, vel in draw(st.lists(st.tuples(st.integers(0, 2500), st.integers(11, 3000),
                                                     st.integers(1, 127)), min_size=1,
                                           max_size=max(1, max_notes // len(pitches)))):
            start = now + gap
            out.append((start / 1000, (start + dur) / 1000, pitch, vel))
            now = start + dur
    return out


@st.composite
def pedals(draw, max_pedals: int = 6) -> list[Pedal]:
    """Disjoint pedal intervals at distinct times; the last one may never be released."""
    times = sorted(draw(st.lists(ms, min_size=0, max_size=2 * max_pedals, unique=True)))
    intervals: list[Pedal] = [(times[i] / 1000, times[i + 1] / 1000) for i in range(0, len(times) - 1, 2)]
    if len(times) % 2 and draw(st.booleans()):
        intervals.append((times[-1] / 1000, None))
    return intervals
