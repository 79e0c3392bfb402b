"""MIDI (symusic Score) <-> token ids.

Two encodings behind one interface (`Tokenizer`):

* `PerformanceTokenizer`: the performance encoding of Performance RNN / Music Transformer (Oore et al.
  2018), the standard for MAESTRO. Ids: PAD=0, BOS=1, EOS=2, then NOTE_ON per pitch, NOTE_OFF per pitch,
  TIME_SHIFT of 1..max_shift_steps steps of 10 ms, VELOCITY bins (emitted only when the bin changes).
* `DurationTokenizer` (dsmr.data.tokenizers.duration): the same notes, each with its length at its onset, so
  that no note can hang in generation.
* `MidiTokTokenizer` (dsmr.data.tokenizers.miditok_bridge): any single-vocabulary miditok tokenizer (REMI, TSD, MIDILike,
  Structured, ...).

Ids describe the events of a piece without BOS/EOS (the stream adds those). `decode` is total: any
sequence of in-range ids gives a valid Score, so a model's samples can always be listened to.

Performance encoding rules (where the papers are silent, these are ours):

* All non-drum tracks are merged into one piano part; drum tracks are skipped. Times are in seconds.
* Sustain (on by default): a note whose key is released while the pedal (CC64 >= 64) is down sounds
  until the pedal is released; a pedal never released holds to the end of the piece (as magenta does).
* Notes outside [min_pitch, max_pitch] are dropped.
* Onsets and offsets are rounded to the nearest 10 ms step. A note shorter than one step after rounding
  lasts one step. Two notes of one pitch starting at the same step are one note (the longer one).
  A note still sounding when its pitch is struck again ends there (NOTE_OFF, then NOTE_ON).
* At one instant: note-offs first (by pitch), then note-ons (by pitch), each note-on preceded by a
  VELOCITY event when its bin differs from the previous note-on's. Leading silence is kept (as time
  shifts); the ids end with the last note-off.
* Velocity bins follow magenta: bin size ceil(127 / bins), bin b holds velocities 1 + b*size ..
  (b+1)*size; decoding gives the middle of the bin (clipped to 127), so a round trip keeps the bin.
"""

from __future__ import annotations

import math
from typing import Sequence

import numpy as np
import symusic

from dsmr.errors import DsmrError
from dsmr.data.midi import DECODE_QPM, DECODE_TPQ, sustained_ends
from dsmr.data.tokenizers.base import (BOS_ID, DEFAULT_VELOCITY, EOS_ID, PAD_ID, SPECIAL_NAMES, STEPS_PER_SECOND,
                                       _TokenizerBase)

# Bump when the performance encoding's rules change, so caches built with the old rules are not reused.
PERFORMANCE_ENCODING_VERSION = 1


# --------------------------------------------------------------------------------- performance encoding


class PerformanceTokenizer(_TokenizerBase):
    """The MAESTRO performance encoding (Performance RNN / Music Transformer); see the module docstring."""

    kind = "performance"

    def __init__(self, min_pitch: int = 0, max_pitch: int = 127, velocity_bins: int = 32,
                 max_shift_steps: int = 100, sustain: bool = True):
        for name, value in (("min_pitch", min_pitch), ("max_pitch", max_pitch),
                            ("velocity_bins", velocity_bins), ("max_shift_steps", max_shift_steps)):
            if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
                raise DsmrError(f"PerformanceTokenizer: {name} must be an integer, got {value!r}")
        if not 0 <= min_pitch <= max_pitch <= 127:
            raise DsmrError(f"PerformanceTokenizer: need 0 <= min_pitch <= max_pitch <= 127, "
                            f"got min_pitch={min_pitch}, max_pitch={max_pitch}")
        if not 1 <= velocity_bins <= 127:
            raise DsmrError(f"PerformanceTokenizer: velocity_bins must be in 1..127, got {velocity_bins}")
        if max_shift_steps < 1:
            raise DsmrError(f"PerformanceTokenizer: max_shift_steps must be >= 1, got {max_shift_steps}")
        if not isinstance(sustain, bool):
            raise DsmrError(f"PerformanceTokenizer: sustain must be true or false, got {sustain!r}")
        self.min_pitch, self.max_pitch = int(min_pitch), int(max_pitch)
        self.velocity_bins, self.max_shift_steps = int(velocity_bins), int(max_shift_steps)
        self.sustain = sustain

        self.num_pitches = self.max_pitch - self.min_pitch + 1
        self.note_on_base = len(SPECIAL_NAMES)
        self.note_off_base = self.note_on_base + self.num_pitches
        self.time_shift_base = self.note_off_base + self.num_pitches
        self.velocity_base = self.time_shift_base + self.max_shift_steps
        self.vocab_size = self.velocity_base + self.velocity_bins
        self.pad_id, self.bos_id, self.eos_id = PAD_ID, BOS_ID, EOS_ID

        # magenta's binning: velocity v (1..127) -> bin (v - 1) // size; bin -> middle velocity.
        self.velocity_bin_size = math.ceil(127 / self.velocity_bins)
        velocities = np.clip(np.arange(128), 1, 127)
        self._bin_of_velocity = (velocities - 1) // self.velocity_bin_size
        lows = 1 + np.arange(self.velocity_bins) * self.velocity_bin_size
        self._velocity_of_bin = np.minimum(lows + self.velocity_bin_size // 2, 127)

        # For decoding, per id: its kind (0 special, 1 on, 2 off, 3 shift, 4 velocity) and its value
        # (pitch, steps, or bin).
        bases = np.array([0, self.note_on_base, self.note_off_base, self.time_shift_base, self.velocity_base])
        self._kind_of_id = np.searchsorted(bases, np.arange(self.vocab_size), side="right") - 1
        self._value_of_id = np.arange(self.vocab_size) - bases[self._kind_of_id]
        self._value_of_id[(self._kind_of_id == 1) | (self._kind_of_id == 2)] += self.min_pitch
        self._value_of_id[self._kind_of_id == 3] += 1

    # ---- configuration

    def config(self) -> dict:
        return {"kind": self.kind, "version": PERFORMANCE_ENCODING_VERSION, "min_pitch": self.min_pitch,
                "max_pitch": self.max_pitch, "velocity_bins": self.velocity_bins,
                "max_shift_steps": self.max_shift_steps, "sustain": self.sustain}

    def __repr__(self) -> str:
        return (f"PerformanceTokenizer(min_pitch={self.min_pitch}, max_pitch={self.max_pitch}, "
                f"velocity_bins={self.velocity_bins}, max_shift_steps={self.max_shift_steps}, "
                f"sustain={self.sustain})")

    # ---- vocabulary

    def event_name(self, i: int) -> str:
        i = int(i)
        if not 0 <= i < self.vocab_size:
            raise DsmrError(f"token id {i} is out of range [0, {self.vocab_size})")
        if i < self.note_on_base:
            return SPECIAL_NAMES[i]
        if i < self.note_off_base:
            return f"NOTE_ON_{self.min_pitch + i - self.note_on_base}"
        if i < self.time_shift_base:
            return f"NOTE_OFF_{self.min_pitch + i - self.note_off_base}"
        if i < self.velocity_base:
            return f"TIME_SHIFT_{(i - self.time_shift_base + 1) * 1000 // STEPS_PER_SECOND}ms"
        return f"VELOCITY_BIN_{i - self.velocity_base}"

    def vocabulary(self) -> list[str]:
        return [self.event_name(i) for i in range(self.vocab_size)]

    def _checked_id(self, i: int) -> int:
        i = int(i)
        if not 0 <= i < self.vocab_size:
            raise DsmrError(f"token id {i} is out of range [0, {self.vocab_size})")
        return i

    def pitch_range(self) -> tuple[int, int]:
        return self.min_pitch, self.max_pitch

    def note_pitch(self, i: int) -> int | None:
        """The pitch of a NOTE_ON event, else None."""
        i = self._checked_id(i)
        return self.min_pitch + i - self.note_on_base if self.note_on_base <= i < self.note_off_base else None

    def note_off_pitch(self, i: int) -> int | None:
        """The pitch of a NOTE_OFF event, else None."""
        i = self._checked_id(i)
        return self.min_pitch + i - self.note_off_base if self.note_off_base <= i < self.time_shift_base else None

    def event_seconds(self, i: int) -> float | None:
        """The length of a TIME_SHIFT event; 0.0 for every other event (a piece lasts the sum of its shifts)."""
        i = self._checked_id(i)
        if self.time_shift_base <= i < self.velocity_base:
            return (i - self.time_shift_base + 1) / STEPS_PER_SECOND
        return 0.0

    # ---- writing events one at a time (live input; `encode` writes whole pieces)

    def shift_ids(self, steps: int) -> list[int]:
        """TIME_SHIFT ids that move the clock `steps` steps of 10 ms (longest shifts first); [] for 0."""
        full, rest = divmod(max(int(steps), 0), self.max_shift_steps)
        return [self.time_shift_base + self.max_shift_steps - 1] * full + ([self.time_shift_base + rest - 1] if rest else [])

    def velocity_id(self, velocity: int) -> int:
        """The VELOCITY id of a MIDI velocity (1..127)."""
        return self.velocity_base + int(self._bin_of_velocity[int(np.clip(velocity, 0, 127))])

    def velocity_of(self, i: int) -> int | None:
        """The MIDI velocity a VELOCITY id sets (its bin's middle), else None."""
        i = self._checked_id(i)
        return int(self._velocity_of_bin[i - self.velocity_base]) if self.velocity_base <= i < self.velocity_base + \
            self.velocity_bins else None

    def note_on_id(self, pitch: int) -> int | None:
        """The NOTE_ON id of a pitch (None outside the encoding's range)."""
        return self.note_on_base + pitch - self.min_pitch if self.min_pitch <= pitch <= self.max_pitch else None

    def note_off_id(self, pitch: int) -> int | None:
        """The NOTE_OFF id of a pitch (None outside the encoding's range)."""
        return self.note_off_base + pitch - self.min_pitch if self.min_pitch <= pitch <= self.max_pitch else None

    # ---- encoding

    def _merged_notes(self, score: symusic.Score) -> tuple[np.ndarray, ...]:
        """(start, end, pitch, velocity) of every non-drum note in seconds, end after sustain."""
        score = score.to("second")
        tracks = []
        for track in score.tracks:
            if track.is_drum or track.note_num() == 0:
                continue
            notes = track.notes.numpy()
            start = notes["time"].astype(np.float64)
            tracks.append((track, start, start + notes["duration"], notes["pitch"], notes["velocity"]))
        if not tracks:
            empty = np.empty(0, np.float64)
            return empty, empty, np.empty(0, np.int64), np.empty(0, np.int64)
        piece_end = max(float(end.max()) for _, _, end, _, _ in tracks)
        columns: list[list[np.ndarray]] = [[], [], [], []]
        for track, start, end, pitch, velocity in tracks:
            if self.sustain and len(track.controls):
                cc = track.controls.numpy()
                end = sustained_ends(end, cc["time"], cc["number"], cc["value"], piece_end)
            for column, values in zip(columns, (start, end, pitch, velocity)):
                column.append(values)
        start, end, pitch, velocity = (np.concatenate(c) for c in columns)
        return start, end, pitch.astype(np.int64), velocity.astype(np.int64)

    def _quantized_notes(self, score: symusic.Score) -> tuple[np.ndarray, ...]:
        """(onset, offset, pitch, velocity bin) in 10 ms steps after the rules of the module docstring."""
        start, end, pitch, velocity = self._merged_notes(score)
        in_range = (pitch >= self.min_pitch) & (pitch <= self.max_pitch)
        start, end, pitch, velocity = start[in_range], end[in_range], pitch[in_range], velocity[in_range]
        onset = np.maximum(np.floor(start * STEPS_PER_SECOND + 0.5), 0).astype(np.int64)
        offset = np.floor(end * STEPS_PER_SECOND + 0.5).astype(np.int64)

        order = np.lexsort((offset, onset, pitch))  # by pitch, then onset, then offset
        onset, offset, pitch, velocity = onset[order], offset[order], pitch[order], velocity[order]
        same_pitch_next = pitch[1:] == pitch[:-1]
        # One note per (pitch, onset): keep the last of each run, which has the latest offset.
        keep = np.ones(onset.size, bool)
        keep[:-1] = ~(same_pitch_next & (onset[1:] == onset[:-1]))
        onset, offset, pitch, velocity = onset[keep], offset[keep], pitch[keep], velocity[keep]
        same_pitch_next = pitch[1:] == pitch[:-1]

        offset = np.maximum(offset, onset + 1)  # at least one step
        next_onset = np.full(onset.size, np.iinfo(np.int64).max)
        next_onset[:-1] = np.where(same_pitch_next, onset[1:], next_onset[:-1])
        offset = np.minimum(offset, next_onset)  # a re-struck note ends where the next one starts
        return onset, offset, pitch, self._bin_of_velocity[np.clip(velocity, 0, 127)]

    def encode(self, score: symusic.Score) -> np.ndarray:
        """Event ids of a Score (any time unit), without BOS/EOS."""
        onset, offset, pitch, vbin = self._quantized_notes(score)
        n = onset.size
        if n == 0:
            return np.empty(0, np.int64)
        # One row per note-off and note-on, ordered by (time, off before on, pitch).
        times = np.concatenate([offset, onset])
        is_on = np.concatenate([np.zeros(n, bool), np.ones(n, bool)])
        pitches = np.concatenate([pitch, pitch]) - self.min_pitch
        bins = np.concatenate([np.full(n, -1), vbin])
        order = np.lexsort((pitches, is_on, times))
        times, is_on, pitches, bins = times[order], is_on[order], pitches[order], bins[order]
        event_ids = np.where(is_on, self.note_on_base, self.note_off_base) + pitches

        on_rows = np.flatnonzero(is_on)
        bin_changes = np.ones(on_rows.size, bool)
        bin_changes[1:] = bins[on_rows[1:]] != bins[on_rows[:-1]]
        has_velocity = np.zeros(times.size, bool)
        has_velocity[on_rows] = bin_changes

        # Each row becomes: its time shifts (full ones, then the remainder), its VELOCITY, its event.
        gaps = np.diff(times, prepend=0)
        full_shifts, remainder = np.divmod(gaps, self.max_shift_steps)
        shift_count = full_shifts + (remainder > 0)
        event_pos = np.cumsum(shift_count + has_velocity + 1) - 1
        out = np.full(int(event_pos[-1]) + 1, self.time_shift_base + self.max_shift_steps - 1, np.int64)
        out[event_pos] = event_ids
        out[event_pos[has_velocity] - 1] = self.velocity_base + bins[has_velocity]
        partial = remainder > 0
        out[event_pos[partial] - has_velocity[partial] - 1] = self.time_shift_base + remainder[partial] - 1
        return out

    def _no_notes_message(self, path) -> str:
        return f"no notes in pitch range {self.min_pitch}-{self.max_pitch}: {path}"

    # ---- decoding

    def decode(self, ids: Sequence[int]) -> symusic.Score:
        """A one-track piano Score (times in seconds) from ids; total for in-range ids.

        PAD/BOS are ignored and EOS ends decoding. A NOTE_OFF of a silent pitch is ignored; a NOTE_ON of
        a sounding pitch ends the old note there (or replaces it if it started at the same instant);
        a note that would last zero time lasts one step; notes still on at the end close at the final
        time (at least one step after their onset).
        """
        ids = self._ids_before_eos(ids)
        starts, ends, pitches, velocities = [], [], [], []
        sounding: dict[int, tuple[int, int]] = {}  # pitch -> (onset step, velocity)
        now, velocity = 0, DEFAULT_VELOCITY

        def close(pitch: int, at: int) -> None:
            onset, vel = sounding.pop(pitch)
            starts.append(onset)
            ends.append(max(at, onset + 1))
            pitches.append(pitch)
            velocities.append(vel)

        for kind, value in zip(self._kind_of_id[ids].tolist(), self._value_of_id[ids].tolist()):
            if kind == 3:
                now += value
            elif kind == 1:
                if value in sounding:
                    if sounding[value][0] == now:
                        del sounding[value]  # struck twice at one instant: one note
                    else:
                        close(value, now)
                sounding[value] = (now, velocity)
            elif kind == 2:
                if value in sounding:
                    close(value, now)
            elif kind == 4:
                velocity = int(self._velocity_of_bin[value])
        for pitch in list(sounding):
            close(pitch, now)
        return _piano_score(np.array(starts), np.array(ends), np.array(pitches), np.array(velocities))

    def seconds(self, ids: Sequence[int]) -> float:
        """Seconds of music the ids describe: the sum of their time shifts (up to the first EOS)."""
        ids = self._ids_before_eos(ids)
        shifts = ids[(ids >= self.time_shift_base) & (ids < self.velocity_base)]
        return float((shifts - self.time_shift_base + 1).sum()) / STEPS_PER_SECOND


def _piano_score(start_steps: np.ndarray, end_steps: np.ndarray, pitch: np.ndarray,
                 velocity: np.ndarray) -> symusic.Score:
    """A Score in seconds with one piano track, a 120 qpm tempo and 4/4, so MIDI tools read it plainly."""
    score = symusic.Score(DECODE_TPQ, ttype="second")
    score.tempos.append(symusic.Tempo(0.0, qpm=DECODE_QPM, ttype="second"))
    score.time_signatures.append(symusic.TimeSignature(0.0, 4, 4, ttype="second"))
    track = symusic.Track("Piano", program=0, ttype="second")
    if start_steps.size:
        order = np.lexsort((pitch, start_steps))
        start = start_steps[order].astype(np.float64) / STEPS_PER_SECOND
        duration = (end_steps[order] - start_steps[order]).astype(np.float64) / STEPS_PER_SECOND
        track.notes = symusic.Note.from_numpy(start.astype(np.float32), duration.astype(np.float32),
                                              pitch[order].astype(np.int8), velocity[order].astype(np.int8),
                                              ttype="second")
    score.tracks.append(track)
    return score
