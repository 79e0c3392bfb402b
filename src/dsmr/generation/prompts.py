"""Prompts and the music clock: the first seconds of a MIDI file as event ids, and the length in seconds of a
growing event sequence."""

from __future__ import annotations

from typing import Optional, Sequence

import numpy as np

from dsmr.errors import DsmrError


def crop_seconds(score, seconds: float):
    """The first `seconds` of a Score (in seconds): notes starting later are dropped, notes sounding at
    the cut end there, and controls (the sustain pedal) after the cut are dropped."""
    import symusic

    if not seconds > 0:
        raise DsmrError(f"prompt seconds must be > 0, got {seconds}")
    cropped = score.to("second").clip(0.0, float(seconds), clip_end=False)
    for track in cropped.tracks:
        if len(track.notes):
            notes = track.notes.numpy()
            duration = np.minimum(notes["duration"], np.float32(seconds) - notes["time"])
            track.notes = symusic.Note.from_numpy(notes["time"], duration.astype(np.float32), notes["pitch"],
                                                  notes["velocity"], ttype="second")
    return cropped


def load_prompt(path, tokenizer, seconds: Optional[float] = None) -> np.ndarray:
    """Event ids of a MIDI prompt (optionally only its first `seconds`); DsmrError when it is missing,
    not MIDI, or has nothing the tokenizer can encode."""
    from dsmr.data.midi import load_midi

    score = load_midi(path)
    where = f"prompt {path}"
    longer = seconds is not None and score.to("second").end() > seconds
    if seconds is not None:
        score = crop_seconds(score, seconds)
        where += f" (first {seconds:g} s)"
    ids = tokenizer.encode(score)
    if len(ids) == 0:
        raise DsmrError(f"{where} has no notes the tokenizer can encode: give a MIDI file with notes"
                        + (" or a longer --prompt-seconds" if seconds is not None else ""))
    ids = np.asarray(ids, dtype=np.int64)
    return extend_to(tokenizer, ids, seconds) if longer else ids


def extend_to(tokenizer, ids: np.ndarray, seconds: float) -> np.ndarray:
    """`ids` with time shifts appended so that they last `seconds`: the silence between a prompt's last event
    and the second it was cut at belongs to the prompt (an encoding whose clock moves only from onset to onset
    would otherwise continue from the last onset). Unchanged where ids have no fixed length in seconds."""
    lengths = [tokenizer.event_seconds(i) for i in range(tokenizer.vocab_size)]
    if any(v is None for v in lengths):
        return ids
    shifts = sorted(((v, i) for i, v in enumerate(lengths) if v > 0), reverse=True)
    if not shifts:
        return ids
    missing, added = seconds - tokenizer.seconds(ids), []
    for length, i in shifts:  # longest first: the fewest ids
        while missing >= length - 1e-9:
            added.append(i)
            missing -= length
    return np.concatenate([ids, np.array(added, dtype=np.int64)]) if added else ids


class MusicClock:
    """Seconds of music of a growing id sequence, cheaply. Where the tokenizer gives every id a fixed length
    (`event_seconds`, e.g. the performance encoding's time shifts) a per-id table suffices; other tokenizers
    re-measure every `every` events."""

    def __init__(self, tokenizer, ids: Sequence[int] = (), every: int = 64):
        self.tokenizer = tokenizer
        self.every = every
        table = [tokenizer.event_seconds(i) for i in range(tokenizer.vocab_size)]
        self._table = None if any(t is None for t in table) else table
        self.seconds = float(tokenizer.seconds(list(ids))) if len(ids) else 0.0
        self._since = 0

    def add(self, token: int, ids: Sequence[int]) -> float:
        """Account for `token`, just appended to `ids` (the whole sequence so far); returns the seconds."""
        if self._table is not None:
            self.seconds += self._table[token]
        else:
            self._since += 1
            if self._since >= self.every:
                self.seconds = float(self.tokenizer.seconds(ids))
                self._since = 0
        return self.seconds
