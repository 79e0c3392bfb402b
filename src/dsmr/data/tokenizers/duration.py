"""The duration encoding: the performance encoding's notes, each given its length at its onset.

In the performance encoding a note ends only when a model emits its NOTE_OFF, so a model must remember every
note still sounding; once a note's onset has left a layer's memory it can hang for tens of seconds. Here a
note carries its length where it starts, so no note can hang, whatever the memory forgets (the idea of
Anticipatory Music Transformer's arrival-time triples and of miditok's duration tokens, kept at the
performance encoding's 10 ms resolution and velocity bins).

Ids: PAD=0, BOS=1, EOS=2, then NOTE per pitch, TIME_SHIFT of 1..max_shift_steps steps of 10 ms, VELOCITY
bins, LENGTH of 1..100 steps (10 ms to 1 s) and LENGTH_SECONDS of 1..max_length_seconds whole seconds.
A note is

    [TIME_SHIFT ...] [VELOCITY] NOTE_p [LENGTH_SECONDS ...] LENGTH_r

with its length = 100 x (the LENGTH_SECONDS together) + r steps, so any length is exact and most notes
(99% of MAESTRO's are shorter than 3.7 s with the pedal) take one or two length ids. Notes are read in
order of onset, then pitch; the time shifts move to each onset only (no offsets to reach), so a piece takes
about as many ids as in the performance encoding.

The notes are those of the performance encoding (`PerformanceTokenizer._quantized_notes`: sustain pedal,
10 ms rounding, re-struck notes ended at the next onset), so both encodings decode a file to the same
Score. `decode` is total: a NOTE with no LENGTH lasts one step; a LENGTH with no NOTE before it is ignored.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import symusic

from dsmr.errors import DsmrError
from dsmr.data.tokenizers.base import DEFAULT_VELOCITY, SPECIAL_NAMES, STEPS_PER_SECOND
from dsmr.data.tokenizers.performance import PerformanceTokenizer, _piano_score

DURATION_ENCODING_VERSION = 1
FINE_STEPS = STEPS_PER_SECOND  # LENGTH_1 .. LENGTH_100: 10 ms .. 1 s

# id kinds, in vocabulary order
_SPECIAL, _NOTE, _SHIFT, _VELOCITY, _LENGTH, _SECONDS = range(6)


class DurationTokenizer(PerformanceTokenizer):
    """The performance encoding's notes with their lengths at their onsets (module docstring)."""

    kind = "duration"

    def __init__(self, min_pitch: int = 0, max_pitch: int = 127, velocity_bins: int = 32,
                 max_shift_steps: int = 100, sustain: bool = True, max_length_seconds: int = 10):
        super().__init__(min_pitch, max_pitch, velocity_bins, max_shift_steps, sustain)
        if isinstance(max_length_seconds, bool) or not isinstance(max_length_seconds, (int, np.integer)) \
                or not 1 <= max_length_seconds <= 600:
            raise DsmrError(f"DurationTokenizer: max_length_seconds must be an integer in 1..600, got "
                            f"{max_length_seconds!r}")
        self.max_length_seconds = int(max_length_seconds)
        self.note_base = len(SPECIAL_NAMES)
        self.time_shift_base = self.note_base + self.num_pitches
        self.velocity_base = self.time_shift_base + self.max_shift_steps
        self.length_base = self.velocity_base + self.velocity_bins
        self.seconds_base = self.length_base + FINE_STEPS
        self.vocab_size = self.seconds_base + self.max_length_seconds
        # the performance encoding's NOTE_ON/NOTE_OFF bases do not apply here
        self.note_on_base = self.note_off_base = None
        bases = np.array([0, self.note_base, self.time_shift_base, self.velocity_base, self.length_base,
                          self.seconds_base])
        self._kind_of_id = np.searchsorted(bases, np.arange(self.vocab_size), side="right") - 1
        self._value_of_id = np.arange(self.vocab_size) - bases[self._kind_of_id]
        self._value_of_id[self._kind_of_id == _NOTE] += self.min_pitch
        for kind in (_SHIFT, _LENGTH, _SECONDS):  # counts start at 1
            self._value_of_id[self._kind_of_id == kind] += 1

    def config(self) -> dict:
        return {"kind": self.kind, "version": DURATION_ENCODING_VERSION, "min_pitch": self.min_pitch,
                "max_pitch": self.max_pitch, "velocity_bins": self.velocity_bins,
                "max_shift_steps": self.max_shift_steps, "sustain": self.sustain,
                "max_length_seconds": self.max_length_seconds}

    def __repr__(self) -> str:
        return (f"DurationTokenizer(min_pitch={self.min_pitch}, max_pitch={self.max_pitch}, "
                f"velocity_bins={self.velocity_bins}, max_shift_steps={self.max_shift_steps}, "
                f"sustain={self.sustain}, max_length_seconds={self.max_length_seconds})")

    # ---- vocabulary

    def event_name(self, i: int) -> str:
        i = self._checked_id(i)
        kind, value = int(self._kind_of_id[i]), int(self._value_of_id[i])
        if kind == _SPECIAL:
            return SPECIAL_NAMES[i]
        if kind == _SHIFT:
            return f"TIME_SHIFT_{value * 1000 // STEPS_PER_SECOND}ms"
        if kind == _LENGTH:
            return f"LENGTH_{value * 1000 // STEPS_PER_SECOND}ms"
        return {_NOTE: "NOTE_{}", _VELOCITY: "VELOCITY_BIN_{}", _SECONDS: "LENGTH_SECONDS_{}"}[kind].format(value)

    def note_pitch(self, i: int) -> int | None:
        """The pitch of a NOTE event (it starts a note), else None."""
        i = self._checked_id(i)
        return int(self._value_of_id[i]) if self._kind_of_id[i] == _NOTE else None

    def note_off_pitch(self, i: int) -> int | None:
        """None: no event ends a note here (a note's length comes with it)."""
        self._checked_id(i)
        return None

    def length_seconds(self, i: int) -> tuple[float, bool] | None:
        """What a length event adds to the NOTE before it: (seconds, whether it completes the length) --
        LENGTH_SECONDS_k (k, False), LENGTH_r (r steps, True); None for every other event."""
        i = self._checked_id(i)
        kind, value = int(self._kind_of_id[i]), int(self._value_of_id[i])
        if kind == _SECONDS:
            return float(value), False
        if kind == _LENGTH:
            return value / STEPS_PER_SECOND, True
        return None

    def event_seconds(self, i: int) -> float | None:
        """The length of a TIME_SHIFT event; 0.0 for every other event (the clock moves from onset to onset)."""
        i = self._checked_id(i)
        return int(self._value_of_id[i]) / STEPS_PER_SECOND if self._kind_of_id[i] == _SHIFT else 0.0

    # ---- writing notes one at a time (live input)

    def velocity_of(self, i: int) -> int | None:
        i = self._checked_id(i)
        return int(self._velocity_of_bin[self._value_of_id[i]]) if self._kind_of_id[i] == _VELOCITY else None

    def note_on_id(self, pitch: int) -> int | None:
        """None: a note is written whole, with its length (`note_ids`)."""
        return None

    def note_off_id(self, pitch: int) -> int | None:
        return None

    def note_ids(self, pitch: int, steps: int) -> list[int]:
        """NOTE and its length ids for a note of `steps` steps of 10 ms (at least one); [] outside the range."""
        if not self.min_pitch <= pitch <= self.max_pitch:
            return []
        return [self.note_base + pitch - self.min_pitch] + self._length_ids(max(int(steps), 1))

    def _length_ids(self, steps: int) -> list[int]:
        whole, fine = divmod(steps - 1, FINE_STEPS)  # steps = 100 * whole + fine + 1
        top = self.max_length_seconds
        out = [self.seconds_base + top - 1] * (whole // top)
        if whole % top:
            out.append(self.seconds_base + whole % top - 1)
        return out + [self.length_base + fine]

    # ---- encoding

    def encode(self, score: symusic.Score) -> np.ndarray:
        """Event ids of a Score (any time unit), without BOS/EOS."""
        onset, offset, pitch, vbin = self._quantized_notes(score)
        if onset.size == 0:
            return np.empty(0, np.int64)
        order = np.lexsort((pitch, onset))
        onset, offset, pitch, vbin = onset[order], offset[order], pitch[order], vbin[order]
        length = offset - onset  # >= 1 step
        out: list[int] = []
        now, last_bin = 0, None
        shift_full = self.time_shift_base + self.max_shift_steps - 1
        for on, steps, p, b in zip(onset.tolist(), length.tolist(), pitch.tolist(), vbin.tolist()):
            gap = on - now
            full, rest = divmod(gap, self.max_shift_steps)
            out.extend([shift_full] * full)
            if rest:
                out.append(self.time_shift_base + rest - 1)
            now = on
            if b != last_bin:
                out.append(self.velocity_base + b)
                last_bin = b
            out.append(self.note_base + p - self.min_pitch)
            out.extend(self._length_ids(steps))
        return np.asarray(out, dtype=np.int64)

    # ---- decoding

    def decode(self, ids: Sequence[int]) -> symusic.Score:
        """A one-track piano Score (times in seconds) from ids; total for in-range ids (module docstring)."""
        ids = self._ids_before_eos(ids)
        starts, ends, pitches, velocities = [], [], [], []
        now, velocity = 0, DEFAULT_VELOCITY
        pending = None  # [pitch, onset, velocity, whole seconds so far] of a NOTE waiting for its LENGTH

        def finish(fine_steps: int) -> None:
            p, onset, vel, whole = pending
            starts.append(onset)
            ends.append(onset + whole * STEPS_PER_SECOND + fine_steps)
            pitches.append(p)
            velocities.append(vel)

        for kind, value in zip(self._kind_of_id[ids].tolist(), self._value_of_id[ids].tolist()):
            if kind == _SECONDS:
                if pending is not None:
                    pending[3] += value
                continue
            if kind == _LENGTH:
                if pending is not None:
                    finish(value)
                    pending = None
                continue
            if pending is not None:  # a NOTE whose length never came: one step (plus any whole seconds)
                finish(1)
                pending = None
            if kind == _SHIFT:
                now += value
            elif kind == _NOTE:
                pending = [value, now, velocity, 0]
            elif kind == _VELOCITY:
                velocity = int(self._velocity_of_bin[value])
        if pending is not None:
            finish(1)
        return _piano_score(np.array(starts), np.array(ends), np.array(pitches), np.array(velocities))

    def seconds(self, ids: Sequence[int]) -> float:
        """Seconds from the start to the last onset the ids describe: the sum of their time shifts (up to the
        first EOS), as the clock of generation counts them."""
        ids = self._ids_before_eos(ids)
        shifts = self._kind_of_id[ids] == _SHIFT
        return float(self._value_of_id[ids][shifts].sum()) / STEPS_PER_SECOND
