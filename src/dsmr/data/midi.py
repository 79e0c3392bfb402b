"""Reading and writing MIDI files (symusic): size and length limits, one-line reasons for files that cannot be
read, and the sustain pedal folded into note lengths."""

from __future__ import annotations

import math
import os
from pathlib import Path

import numpy as np
import symusic

from dsmr.core.atomic import atomic_write_bytes
from dsmr.errors import DsmrError
from dsmr.core.files import MAX_FILE_BYTES, MAX_PIECE_SECONDS, read_regular


SUSTAIN_CC = 64
# Decoded scores: 1 tick = 1 ms (500 ticks per quarter at 120 qpm), so every 10 ms step is exact in ticks.
DECODE_TPQ = 500
DECODE_QPM = 120.0
DEFAULT_MAX_SECONDS = MAX_PIECE_SECONDS  # longest piece encode_file accepts


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
