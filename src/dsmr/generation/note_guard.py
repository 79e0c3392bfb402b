"""Sampling that cannot leave a note hanging, for encodings whose notes end with a NOTE_OFF event.

In the performance encoding a note ends only when the model emits its NOTE_OFF, so the model must remember
every note still sounding; once a note's NOTE_ON has left a layer's memory nothing in the state says it is
on, and a small model leaves it on for tens of seconds while more notes pile up. The guard keeps, per lane,
the pitches sounding and when each started, and before every draw bans what would break the rules:

* a NOTE_OFF of a pitch that is silent (it means nothing). A NOTE_ON of a pitch already sounding stays
  allowed: it ends the old note there (dsmr.data.tokenizers.performance), and a model that forgot a note often releases it so;
* with `max_note_seconds`: any TIME_SHIFT that would carry a sounding note past that length; when not even
  the shortest shift fits, only the NOTE_OFFs of the notes at their limit may come next;
* with `max_polyphony`: while that many notes sound, no NOTE_ON and no event that only prepares one (a
  VELOCITY): the model releases a note or lets time pass. (Banning only the note-ons left a model that
  wanted to play emitting VELOCITY events, tens of thousands in a row; releasing the oldest note instead,
  as a synthesizer steals a voice, let it add notes as fast as before: measured in docs/generation.md.)

Everything else is the model's choice, renormalised over what is left (dsmr.generation.sample_next).

Encodings that give each note its length at its onset (the duration encoding) cannot leave a note hanging,
but a model can still choose a length longer than any pianist holds a note. `LengthGuard` applies
`max_note_seconds` there: it bans the length events that would make the note being written longer than the
limit (the shortest completion always fits, so it never forces anything). Most notes at once needs NOTE_OFFs.
"""

from __future__ import annotations

from typing import Optional, Sequence

import numpy as np
import torch
from torch import Tensor

from dsmr.errors import DsmrError

PITCHES = 128


def has_note_offs(tokenizer) -> bool:
    """Whether the encoding ends notes with NOTE_OFF events (and so can leave a note hanging)."""
    off_pitch = getattr(tokenizer, "note_off_pitch", None)
    return off_pitch is not None and any(off_pitch(i) is not None for i in range(tokenizer.vocab_size))


def has_note_lengths(tokenizer) -> bool:
    """Whether the encoding gives each note its length at its onset (length events after the note)."""
    return callable(getattr(tokenizer, "length_seconds", None))


def guard_for(tokenizer, max_note_seconds: Optional[float] = None, max_polyphony: Optional[int] = None) -> dict:
    """SamplingConfig fields from a command line's or the page's guard options: None means dsmr.generation.defaults's
    default for the encoding (NOTE_OFFs: longest note and most at once; lengths at onset: longest note;
    other encodings: none), 0 means no limit."""
    from dsmr.generation import defaults
    offs, lengths = has_note_offs(tokenizer), has_note_lengths(tokenizer)
    if max_note_seconds is None:
        max_note_seconds = (defaults.MAX_NOTE_SECONDS if offs else
                            defaults.MAX_NOTE_SECONDS_LENGTHS_AT_ONSET if lengths else 0)
    if max_polyphony is None:
        max_polyphony = defaults.MAX_POLYPHONY if offs else 0
    guard = {"max_note_seconds": float(max_note_seconds) or None, "max_polyphony": int(max_polyphony) or None}
    _check_encoding(tokenizer, **guard)
    return guard


def _check_encoding(tokenizer, max_note_seconds: Optional[float], max_polyphony: Optional[int]) -> None:
    """DsmrError when a limit that is on cannot apply to the encoding."""
    offs = has_note_offs(tokenizer)
    if max_polyphony is not None and not offs:
        raise DsmrError(f"the most-notes-at-once limit (max_polyphony) needs an encoding whose notes end with "
                        f"NOTE_OFF events; {tokenizer!r} has none (use 0)")
    if max_note_seconds is not None and not (offs or has_note_lengths(tokenizer)):
        raise DsmrError(f"the longest-note limit (max_note_seconds) needs an encoding whose notes end with "
                        f"NOTE_OFF events or carry their length; {tokenizer!r} has neither (use 0)")


def make_guard(tokenizer, num_lanes: int, max_note_seconds: Optional[float] = None,
               max_polyphony: Optional[int] = None, device=None):
    """The guard for the encoding (NoteGuard for NOTE_OFFs, LengthGuard for lengths at onset); None when
    both limits are off."""
    if max_note_seconds is None and max_polyphony is None:
        return None
    _check_encoding(tokenizer, max_note_seconds, max_polyphony)
    if has_note_offs(tokenizer):
        return NoteGuard(tokenizer, num_lanes, max_note_seconds, max_polyphony, device=device)
    return LengthGuard(tokenizer, num_lanes, max_note_seconds, device=device)


class NoteGuard:
    """The notes sounding in each of `num_lanes` lanes, and the events they forbid next. Bookkeeping in
    NumPy: a few arrays of 128 pitches per lane, where PyTorch's per-op overhead would cost more than a
    decoding step."""

    def __init__(self, tokenizer, num_lanes: int, max_note_seconds: Optional[float] = None,
                 max_polyphony: Optional[int] = None, device=None):
        vocab = range(tokenizer.vocab_size)
        if not has_note_offs(tokenizer):
            raise DsmrError(f"the note guard needs an encoding whose notes end with NOTE_OFF events; {tokenizer!r} "
                            "has none (its notes cannot hang: generate without the guard)")
        on = [tokenizer.note_pitch(i) for i in vocab]
        off = [tokenizer.note_off_pitch(i) for i in vocab]
        self.device = device
        self.on_pitch = np.array([-1 if p is None else p for p in on])
        self.off_pitch = np.array([-1 if p is None else p for p in off])
        self.shift = np.array([tokenizer.event_seconds(i) or 0.0 for i in vocab], dtype=np.float64)
        self.is_on, self.is_off, self.is_shift = self.on_pitch >= 0, self.off_pitch >= 0, self.shift > 0
        # events that take no time and start or end no note (VELOCITY): they only prepare a note-on
        self.is_setting = ~(self.is_on | self.is_off | self.is_shift)
        self.is_setting[[tokenizer.pad_id, tokenizer.bos_id, tokenizer.eos_id]] = False
        self.off_ids = np.flatnonzero(self.is_off)
        self.off_ids_pitch = self.off_pitch[self.off_ids]
        self.starts_or_prepares = self.is_on | self.is_setting
        self.min_shift = float(self.shift[self.is_shift].min()) if self.is_shift.any() else 0.0
        self.max_note_seconds, self.max_polyphony = max_note_seconds, max_polyphony
        # onset time of each sounding pitch (NaN: silent), and the time now, per lane
        self.onset = np.full((num_lanes, PITCHES), np.nan)
        self.now = np.zeros(num_lanes)
        self.forced_events = 0  # draws where only note-offs were allowed (reported in the result)

    def feed(self, ids: Sequence[int]) -> None:
        """Account for a prompt's events, in every lane."""
        for token in ids:
            self.update(np.full(self.onset.shape[0], int(token)))

    def update(self, tokens) -> None:
        """Account for the event just drawn in each lane ([lanes] ids: a tensor or an array)."""
        if isinstance(tokens, torch.Tensor):
            tokens = tokens.cpu().numpy()
        lanes = np.arange(len(tokens))
        on, off = self.on_pitch[tokens], self.off_pitch[tokens]
        started, ended = on >= 0, off >= 0
        self.onset[lanes[started], on[started]] = self.now[started]
        self.onset[lanes[ended], off[ended]] = np.nan
        self.now += self.shift[tokens]

    def banned(self) -> Tensor:
        """Bool [lanes, vocab]: the events each lane may not draw next."""
        sounding = ~np.isnan(self.onset)
        ban = np.zeros((sounding.shape[0], len(self.on_pitch)), dtype=bool)
        ban[:, self.off_ids] = ~sounding[:, self.off_ids_pitch]
        if self.max_polyphony is not None:
            full = sounding.sum(axis=1) >= self.max_polyphony
            ban[full] |= self.starts_or_prepares
        if self.max_note_seconds is not None:
            age = np.where(sounding, self.now[:, None] - self.onset, -np.inf)
            headroom = self.max_note_seconds - age.max(axis=1)                      # +inf when nothing sounds
            ban |= self.is_shift[None] & (self.shift[None] > headroom[:, None] + 1e-9)
            must_end = age + self.min_shift > self.max_note_seconds + 1e-9         # cannot outlast one more shift
            for lane in np.flatnonzero(must_end.any(axis=1)):
                ban[lane] = True
                ban[lane, self.off_ids[must_end[lane, self.off_ids_pitch]]] = False
                self.forced_events += 1
        return torch.from_numpy(ban).to(self.device)


class LengthGuard:
    """No note longer than `max_note_seconds` in an encoding that writes each note's length after it (NOTE,
    then whole-second and fine length events). Per lane: the seconds already given to the note being
    written (NaN when none is), and the length events that would carry it past the limit."""

    forced_events = 0  # the shortest completion always fits: nothing is ever forced

    def __init__(self, tokenizer, num_lanes: int, max_note_seconds: float, device=None):
        if not has_note_lengths(tokenizer):
            raise DsmrError(f"LengthGuard needs an encoding that gives each note its length; {tokenizer!r} has none")
        parts = [tokenizer.length_seconds(i) for i in range(tokenizer.vocab_size)]
        self.device = device
        self.max_note_seconds = float(max_note_seconds)
        self.starts = np.array([tokenizer.note_pitch(i) is not None for i in range(tokenizer.vocab_size)])
        self.adds = np.array([0.0 if p is None else p[0] for p in parts])
        self.completes = np.array([p is not None and p[1] for p in parts])
        self.extends = np.array([p is not None and not p[1] for p in parts])
        # the shortest length that completes a note: after the last whole second, at least this much comes
        self.min_completion = float(self.adds[self.completes].min()) if self.completes.any() else 0.0
        self.written = np.full(num_lanes, np.nan)

    def feed(self, ids: Sequence[int]) -> None:
        """Account for a prompt's events, in every lane."""
        for token in ids:
            self.update(np.full(len(self.written), int(token)))

    def update(self, tokens) -> None:
        """Account for the event just drawn in each lane ([lanes] ids: a tensor or an array)."""
        if isinstance(tokens, torch.Tensor):
            tokens = tokens.cpu().numpy()
        extending = self.extends[tokens] & ~np.isnan(self.written)
        self.written = np.where(self.starts[tokens], 0.0,
                                np.where(extending, self.written + self.adds[tokens], np.nan))

    def banned(self) -> Tensor:
        """Bool [lanes, vocab]: the length events that would make the current note too long."""
        written = np.nan_to_num(self.written, nan=-np.inf)[:, None]
        total = written + self.adds[None] + np.where(self.extends, self.min_completion, 0.0)[None]
        ban = (self.extends | self.completes)[None] & (total > self.max_note_seconds + 1e-9)
        return torch.from_numpy(ban).to(self.device)


def check_guard_options(max_note_seconds: Optional[float], max_polyphony: Optional[int]) -> list[str]:
    """Problems with the guard's options (for SamplingConfig.validate)."""
    problems = []
    if max_note_seconds is not None and not (isinstance(max_note_seconds, (int, float))
                                             and 0.01 <= max_note_seconds <= 3600):
        problems.append(f"max_note_seconds must be a number of seconds in [0.01, 3600], got {max_note_seconds!r}")
    if max_polyphony is not None and (isinstance(max_polyphony, bool) or not isinstance(max_polyphony, int)
                                      or not 1 <= max_polyphony <= PITCHES):
        problems.append(f"max_polyphony must be an integer in [1, {PITCHES}], got {max_polyphony!r}")
    return problems
