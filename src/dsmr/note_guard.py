"""Sampling that cannot leave a note hanging, for encodings whose notes end with a NOTE_OFF event.

In the performance encoding a note ends only when the model emits its NOTE_OFF, so the model must remember
every note still sounding; once a note's NOTE_ON has left a layer's memory nothing in the state says it is
on, and a small model leaves it on for tens of seconds while more notes pile up. The guard keeps, per lane,
the pitches sounding and when each started, and before every draw bans what would break the rules:

* a NOTE_OFF of a pitch that is silent (it means nothing). A NOTE_ON of a pitch already sounding stays
  allowed: it ends the old note there (dsmr.tokenizer), and a model that forgot a note often releases it so;
* with `max_note_seconds`: any TIME_SHIFT that would carry a sounding note past that length; when not even
  the shortest shift fits, only the NOTE_OFFs of the notes at their limit may come next;
* with `max_polyphony`: when that many notes sound, the next event must release the oldest of them (as a
  synthesizer steals a voice). Banning note-ons instead left a model that wanted to play with nothing to
  do but emit VELOCITY events, thousands in a row.

Everything else is the model's choice, renormalised over what is left (dsmr.generate.sample_next).
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch
from torch import Tensor

from dsmr.errors import DsmrError

PITCHES = 128
# What `dsmr generate` and the app use unless told otherwise, for encodings with NOTE_OFF events: on MAESTRO's
# training split (sustain pedal applied) 99.9% of notes are shorter than 9.8 s (docs/generation.md).
DEFAULT_MAX_NOTE_SECONDS = 10.0


def has_note_offs(tokenizer) -> bool:
    """Whether the encoding ends notes with NOTE_OFF events (and so can leave a note hanging)."""
    off_pitch = getattr(tokenizer, "note_off_pitch", None)
    return off_pitch is not None and any(off_pitch(i) is not None for i in range(tokenizer.vocab_size))


def guard_for(tokenizer, max_note_seconds: Optional[float] = None, max_polyphony: Optional[int] = None) -> dict:
    """SamplingConfig fields from a command line's or the page's guard options: max_note_seconds None means
    the default (for encodings with NOTE_OFFs), 0 means off; max_polyphony None or 0 means no limit."""
    if max_note_seconds is None:
        max_note_seconds = DEFAULT_MAX_NOTE_SECONDS if has_note_offs(tokenizer) else 0
    guard = {"max_note_seconds": float(max_note_seconds) or None, "max_polyphony": int(max_polyphony or 0) or None}
    if (guard["max_note_seconds"] or guard["max_polyphony"]) and not has_note_offs(tokenizer):
        raise DsmrError(f"the note guard (longest note, most notes at once) needs an encoding whose notes end "
                        f"with NOTE_OFF events; {tokenizer!r} gives each note its length, so none can hang")
    return guard


class NoteGuard:
    """The notes sounding in each of `num_lanes` lanes, and the events they forbid next."""

    def __init__(self, tokenizer, num_lanes: int, max_note_seconds: Optional[float] = None,
                 max_polyphony: Optional[int] = None, device=None):
        vocab = range(tokenizer.vocab_size)
        if not has_note_offs(tokenizer):
            raise DsmrError(f"the note guard needs an encoding whose notes end with NOTE_OFF events; {tokenizer!r} "
                            "has none (its notes cannot hang: generate without the guard)")
        on = [tokenizer.note_pitch(i) for i in vocab]
        off = [tokenizer.note_off_pitch(i) for i in vocab]
        shifts = [tokenizer.event_seconds(i) or 0.0 for i in vocab]
        self.device = device
        self.on_pitch = torch.tensor([-1 if p is None else p for p in on], device=device)
        self.off_pitch = torch.tensor([-1 if p is None else p for p in off], device=device)
        self.shift = torch.tensor(shifts, dtype=torch.float64, device=device)
        self.is_on, self.is_off, self.is_shift = self.on_pitch >= 0, self.off_pitch >= 0, self.shift > 0
        self.min_shift = float(self.shift[self.is_shift].min()) if bool(self.is_shift.any()) else 0.0
        self.max_note_seconds, self.max_polyphony = max_note_seconds, max_polyphony
        # onset time of each sounding pitch (NaN: silent), and the time now, per lane
        self.onset = torch.full((num_lanes, PITCHES), float("nan"), dtype=torch.float64, device=device)
        self.now = torch.zeros(num_lanes, dtype=torch.float64, device=device)
        self.forced_events = 0  # draws where only note-offs were allowed (reported in the result)

    def feed(self, ids: Sequence[int]) -> None:
        """Account for a prompt's events, in every lane."""
        for token in ids:
            self.update(torch.full((self.onset.shape[0],), int(token), device=self.device))

    def update(self, tokens: Tensor) -> None:
        """Account for the event just drawn in each lane ([lanes] ids)."""
        lanes = torch.arange(tokens.shape[0], device=tokens.device)
        on, off = self.on_pitch[tokens], self.off_pitch[tokens]
        started, ended = on >= 0, off >= 0
        self.onset[lanes[started], on[started]] = self.now[started]
        self.onset[lanes[ended], off[ended]] = float("nan")
        self.now += self.shift[tokens]

    def banned(self) -> Tensor:
        """Bool [lanes, vocab]: the events each lane may not draw next."""
        sounding = ~self.onset.isnan()
        lanes = sounding.shape[0]
        ban = torch.zeros(lanes, self.on_pitch.shape[0], dtype=torch.bool, device=self.onset.device)
        ban[:, self.is_off] = ~sounding[:, self.off_pitch[self.is_off]]
        # the notes that must end next (per lane, [lanes, 128]): none by default
        must_end = torch.zeros_like(sounding)
        age = torch.where(sounding, self.now[:, None] - self.onset, float("-inf"))
        if self.max_note_seconds is not None:
            headroom = self.max_note_seconds - age.amax(dim=1)                     # +inf when nothing sounds
            ban |= self.is_shift[None] & (self.shift[None] > headroom[:, None] + 1e-9)
            must_end |= age + self.min_shift > self.max_note_seconds + 1e-9       # cannot outlast one more shift
        if self.max_polyphony is not None:
            full = sounding.sum(dim=1) >= self.max_polyphony
            oldest = torch.nn.functional.one_hot(age.argmax(dim=1), PITCHES).bool()
            must_end |= full[:, None] & oldest
        forced = must_end.any(dim=1)
        if bool(forced.any()):
            allowed = self.is_off[None] & must_end[:, self.off_pitch.clamp(min=0)]
            ban = torch.where(forced[:, None], ~allowed, ban)
            self.forced_events += int(forced.sum())
        return ban


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
