"""MIDI (symusic Score) <-> token ids.

Two encodings behind one interface (`Tokenizer`):

* `PerformanceTokenizer`: the performance encoding of Performance RNN / Music Transformer (Oore et al.
  2018), the standard for MAESTRO. Ids: PAD=0, BOS=1, EOS=2, then NOTE_ON per pitch, NOTE_OFF per pitch,
  TIME_SHIFT of 1..max_shift_steps steps of 10 ms, VELOCITY bins (emitted only when the bin changes).
* `DurationTokenizer` (dsmr.duration_encoding): the same notes, each with its length at its onset, so
  that no note can hang in generation.
* `MidiTokTokenizer` (dsmr.miditok_encoding): any single-vocabulary miditok tokenizer (REMI, TSD, MIDILike,
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

import hashlib
import json
import math
import os
from pathlib import Path
from typing import Iterable, Protocol, Sequence, runtime_checkable

import numpy as np
import symusic

from dsmr.atomic import atomic_write_bytes
from dsmr.errors import DsmrError
from dsmr.files import MAX_FILE_BYTES, MAX_PIECE_SECONDS, read_regular

PAD_ID, BOS_ID, EOS_ID = 0, 1, 2
SPECIAL_NAMES = ("PAD", "BOS", "EOS")
STEPS_PER_SECOND = 100  # one TIME_SHIFT step is 10 ms
SUSTAIN_CC = 64
# Bump when the performance encoding's rules change, so caches built with the old rules are not reused.
PERFORMANCE_ENCODING_VERSION = 1
# Decoded scores: 1 tick = 1 ms (500 ticks per quarter at 120 qpm), so every 10 ms step is exact in ticks.
DECODE_TPQ = 500
DECODE_QPM = 120.0
DEFAULT_VELOCITY = 64  # for NOTE_ONs sampled before any VELOCITY event
DEFAULT_MAX_SECONDS = MAX_PIECE_SECONDS  # longest piece encode_file accepts


@runtime_checkable
class Tokenizer(Protocol):
    vocab_size: int
    pad_id: int
    bos_id: int
    eos_id: int

    def encode(self, score: symusic.Score) -> np.ndarray: ...
    def decode(self, ids: Sequence[int]) -> symusic.Score: ...
    def encode_file(self, path: str | os.PathLike, *, max_seconds: float | None = ...,
                    max_bytes: int | None = ...) -> np.ndarray: ...
    def decode_to_file(self, ids: Sequence[int], path: str | os.PathLike) -> None: ...
    def config(self) -> dict: ...
    def config_hash(self) -> str: ...
    def event_name(self, i: int) -> str: ...
    def vocabulary(self) -> list[str]: ...
    def seconds(self, ids: Sequence[int]) -> float: ...
    def note_pitch(self, i: int) -> int | None: ...
    def note_off_pitch(self, i: int) -> int | None: ...
    def pitch_range(self) -> tuple[int, int]: ...
    def count_notes(self, pieces: Iterable[Sequence[int] | np.ndarray]) -> int: ...
    def event_seconds(self, i: int) -> float | None: ...


# ----------------------------------------------------------------------------------------------- helpers


def load_midi(path: str | os.PathLike, max_bytes: int | None = MAX_FILE_BYTES) -> symusic.Score:
    """Read a MIDI file into a Score; DsmrError naming the path when it is missing, not a regular file
    (a FIFO, a device, a link loop), larger than `max_bytes`, empty or unreadable."""
    path = Path(path)
    data = read_regular(path, max_bytes, what="MIDI file")
    if not data:
        raise DsmrError(f"empty file (0 bytes): {path}")
    try:
        # From bytes, not from the path: symusic picks a parser by file extension, we always want MIDI.
        return symusic.Score.from_midi(data)
    except Exception as err:  # symusic raises plain RuntimeError/ValueError for corrupt data
        raise DsmrError(f"not a readable MIDI file: {path} (its data is damaged or it is not MIDI: "
                        f"{_midi_problem(err)})") from err


def _midi_problem(err: Exception) -> str:
    """The MIDI parser's complaint in plain words (it writes "MiniMidi: Invaild midi file! ... iostream")."""
    text = str(err).lower()
    if "not mthd" in text:
        return "it does not start with a MIDI header"
    if "chunk length" in text or "remaining bytes" in text or "eof" in text or "truncat" in text:
        return "it ends before the end of its data (truncated?)"
    if "track" in text or "mtrk" in text:
        return "a damaged track"
    return "the parser could not read it"


def check_piece_bounds(score: symusic.Score, path, max_seconds: float | None = DEFAULT_MAX_SECONDS) -> None:
    """DsmrError when a Score cannot be real music or would expand into too many events: a header
    division (ticks per quarter) that is not positive, times that are not finite, or a piece lasting
    longer than `max_seconds` (a few bytes with a huge delta time, or `division = 1`, make a piece of
    thousands of hours, i.e. hundreds of millions of time-shift tokens)."""
    tpq = int(score.ticks_per_quarter)
    if tpq <= 0:
        raise DsmrError(f"{path}: the MIDI header's division is {tpq} ticks per quarter note (must be positive)")
    end_ticks = int(score.end()) if score.tracks else 0
    if max_seconds is None or end_ticks == 0:
        return
    # Bound the length in quarter notes first: it needs no tempo map, and it is what bar/beat-based
    # tokenizers (REMI, ...) expand; 16 quarters a second is far beyond any notated tempo.
    if end_ticks / tpq > max_seconds * 16:
        raise DsmrError(f"{path}: piece is {end_ticks / tpq:,.0f} quarter notes long (over "
                        f"{_duration_words(end_ticks / tpq / 16)} even at 16 quarter notes a second); the "
                        f"limit is {_duration_words(max_seconds)} (max_seconds)")
    seconds = float(score.to("second").end())
    if not math.isfinite(seconds):
        raise DsmrError(f"{path}: note times are not finite numbers after the tempo map (corrupt tempo events)")
    if seconds > max_seconds:
        raise DsmrError(f"{path}: piece lasts {_duration_words(seconds)}; the limit is "
                        f"{_duration_words(max_seconds)} (max_seconds)")


def _duration_words(seconds: float) -> str:
    if seconds >= 2 * 3600:
        return f"{seconds / 3600:,.0f} hours"
    if seconds >= 600:
        return f"{seconds / 60:,.0f} minutes"
    return f"{seconds:,.0f} seconds"


def write_midi(score: symusic.Score, path: str | os.PathLike) -> None:
    """Write a Score as a standard MIDI file, atomically. The bytes are written from Python, so that a full
    disk is an error (symusic's own file writer can leave an empty file without one)."""
    atomic_write_bytes(path, score.dumps_midi())


def canonical_hash(cfg: dict) -> str:
    """sha256 hex of a config's canonical JSON (sorted keys, no spaces)."""
    text = json.dumps(cfg, sort_keys=True, separators=(",", ":"), ensure_ascii=True)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def _as_id_array(ids: Sequence[int] | np.ndarray, vocab_size: int) -> np.ndarray:
    """ids as int64; DsmrError naming the first id outside [0, vocab_size)."""
    arr = np.asarray(ids)
    if arr.ndim != 1:
        raise DsmrError(f"token ids must be a flat sequence, got an array of shape {arr.shape}")
    if arr.size and not np.issubdtype(arr.dtype, np.integer):
        raise DsmrError(f"token ids must be integers, got dtype {arr.dtype}")
    arr = arr.astype(np.int64, copy=False)
    bad = np.flatnonzero((arr < 0) | (arr >= vocab_size))
    if bad.size:
        raise DsmrError(f"token id {int(arr[bad[0]])} at position {int(bad[0])} is out of range [0, {vocab_size})")
    return arr


def sustained_ends(ends: np.ndarray, cc_time: np.ndarray, cc_number: np.ndarray, cc_value: np.ndarray,
                   piece_end: float) -> np.ndarray:
    """Note ends after the sustain pedal: an end while CC64 is down (>= 64) moves to the pedal's release.

    Works in any time unit (seconds or ticks). A pedal still down after the last CC64 event is released
    at `piece_end`. An end exactly at a press is sustained, one exactly at a release is not (magenta's
    order: pedal events before note-offs at one instant).
    """
    is_sustain = cc_number == SUSTAIN_CC
    if not is_sustain.any() or ends.size == 0:
        return ends
    order = np.argsort(cc_time[is_sustain], kind="stable")
    times = cc_time[is_sustain][order].astype(np.float64)
    down = cc_value[is_sustain][order] >= 64
    was_down = np.concatenate([[False], down[:-1]])
    presses = times[down & ~was_down]
    releases = times[~down & was_down]
    if presses.size > releases.size:  # the pedal is never lifted
        releases = np.append(releases, max(float(piece_end), presses[-1]))
    if presses.size == 0:
        return ends
    k = np.searchsorted(presses, ends, side="right") - 1  # last press at or before each end
    k_safe = np.maximum(k, 0)
    held = (k >= 0) & (ends < releases[k_safe])
    return np.where(held, releases[k_safe], ends)


class _TokenizerBase:
    """What every dsmr tokenizer shares: config hashing and equality, name lookup, file output."""

    vocab_size: int
    eos_id: int

    def config(self) -> dict:
        raise NotImplementedError

    def vocabulary(self) -> list[str]:
        raise NotImplementedError

    def decode(self, ids: Sequence[int]) -> symusic.Score:
        raise NotImplementedError

    def config_hash(self) -> str:
        return canonical_hash(self.config())

    def __eq__(self, other: object) -> bool:
        return type(other) is type(self) and self.config() == other.config()  # type: ignore[attr-defined]

    def __hash__(self) -> int:
        return hash(self.config_hash())

    def event_id(self, name: str) -> int:
        """The id of an event name (the inverse of `event_name`)."""
        if getattr(self, "_ids_by_name", None) is None:
            self._ids_by_name = {event: i for i, event in enumerate(self.vocabulary())}
        if name not in self._ids_by_name:
            raise DsmrError(f"unknown event name {name!r} for {self!r}")
        return self._ids_by_name[name]

    def encode_file(self, path: str | os.PathLike, *, max_seconds: float | None = DEFAULT_MAX_SECONDS,
                    max_bytes: int | None = MAX_FILE_BYTES) -> np.ndarray:
        """Event ids of a MIDI file. Every failure is a DsmrError that names the path and says what is
        wrong: not a regular file, larger than `max_bytes`, not MIDI, a piece longer than `max_seconds`
        (None: no limit), or no notes to encode."""
        score = load_midi(path, max_bytes)
        check_piece_bounds(score, path, max_seconds)
        try:
            ids = self.encode(score)
        except DsmrError:
            raise
        except MemoryError:
            raise DsmrError(f"{path}: out of memory while encoding the piece") from None
        except Exception as err:  # a parser or tokenizer bug on a strange file: still the user's file
            raise DsmrError(f"{path}: cannot encode the piece ({type(err).__name__}: {err})") from err
        ids = np.asarray(ids)
        if ids.ndim != 1 or (ids.size and not np.issubdtype(ids.dtype, np.integer)):
            raise DsmrError(f"{path}: the tokenizer returned an array of shape {ids.shape} and dtype {ids.dtype}")
        if ids.size == 0:
            raise DsmrError(self._no_notes_message(path))
        if ids.min() < 0 or ids.max() >= self.vocab_size:
            raise DsmrError(f"{path}: the tokenizer returned ids outside 0..{self.vocab_size - 1}")
        return ids.astype(np.int64, copy=False)

    def _no_notes_message(self, path) -> str:
        return f"no notes to encode: {path}"

    def note_pitch(self, i: int) -> int | None:
        """The MIDI pitch of event `i` when it starts a note, else None."""
        return None

    def note_off_pitch(self, i: int) -> int | None:
        """The MIDI pitch of event `i` when it ends a note, else None (also for encodings whose notes carry
        their duration, which cannot leave a note hanging)."""
        return None

    def pitch_range(self) -> tuple[int, int]:
        """The lowest and highest MIDI pitch the encoding can hold."""
        return 0, 127

    def note_start_mask(self) -> np.ndarray:
        """Per id, whether the event starts a note (`note_pitch` is not None): what `count_notes` counts."""
        if getattr(self, "_note_start_mask", None) is None:
            self._note_start_mask = np.array([self.note_pitch(i) is not None for i in range(self.vocab_size)])
        return self._note_start_mask

    def count_notes(self, pieces: Iterable[Sequence[int] | np.ndarray]) -> int:
        """Notes the pieces hold: one per note-starting event, whatever the encoding (so a model's loss can be
        put per note, the one scale on which encodings with different tokens per note compare)."""
        mask = self.note_start_mask()
        return sum(int(mask[np.asarray(ids, dtype=np.int64)].sum()) for ids in pieces)

    def event_seconds(self, i: int) -> float | None:
        """Seconds that event `i` adds to the music wherever it occurs, so that a piece lasts the sum over its
        events (a time shift's length; 0 for events that take no time); None when the id alone does not
        fix it (time that depends on the events around it, or on a tempo)."""
        return None

    def decode_to_file(self, ids: Sequence[int], path: str | os.PathLike) -> None:
        """Decode ids and write them as a standard MIDI file, atomically."""
        write_midi(self.decode(ids), path)

    def _ids_before_eos(self, ids: Sequence[int]) -> np.ndarray:
        """ids as int64, checked against the vocabulary, cut at the first EOS."""
        ids = _as_id_array(ids, self.vocab_size)
        eos = np.flatnonzero(ids == self.eos_id)
        return ids[: eos[0]] if eos.size else ids


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
