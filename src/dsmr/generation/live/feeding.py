"""Feeding the decoder's state in the stream's own encoding: the player's notes (and the model's, after a
takeover) as time shifts, VELOCITY events and notes, from where the stream's clock stands."""

from __future__ import annotations

import torch

from dsmr.generation.live.events import Note
from dsmr.generation.sampling import sample_next


class StateFeeding:
    """The part of `LiveEngine` that writes events into its decoder: it keeps `fed_step` (the stream's clock),
    `bin` (the VELOCITY in force), `logits` and the note guard in step with what was fed."""

    def _feed_event(self, step: int, kind: str, pitch: int, velocity: int = 0) -> None:
        """Performance encoding: the time shift to `step`, then a note-on (with its VELOCITY) or a note-off."""
        tok = self.tokenizer
        ids = tok.shift_ids(step - self.fed_step)
        self.fed_step = max(step, self.fed_step)
        if kind == "on":
            event = tok.note_on_id(pitch)
            if event is None:
                return self._feed(ids)
            ids += self._velocity_ids(velocity) + [event]
        else:
            event = tok.note_off_id(pitch)
            if event is not None:
                ids.append(event)
        self._feed(ids)

    def _feed_note(self, note: Note) -> None:
        """Duration encoding: the time shift to the note's onset, its VELOCITY, the note with its length."""
        tok = self.tokenizer
        ids = tok.shift_ids(note.onset - self.fed_step)
        self.fed_step = max(note.onset, self.fed_step)
        written = tok.note_ids(note.pitch, note.end - note.onset)
        if written:
            ids += self._velocity_ids(note.velocity) + written
        self._feed(ids)

    def _velocity_ids(self, velocity: int) -> list[int]:
        """The VELOCITY id a note needs before it: none when the stream's velocity bin is already its."""
        v = self.tokenizer.velocity_id(velocity)
        if v == self.bin:
            return []
        self.bin = v
        return [v]

    def _flush_pending(self, force: bool = False) -> None:
        """Duration encoding: feed the player's notes whose lengths are known, in onset order (`force`: also
        the held ones, with their lengths so far)."""
        if self.kind != "lengths":
            return
        self.pending.sort(key=lambda n: (n.onset, n.pitch))
        while self.pending and (self.pending[0].end is not None or force):
            note = self.pending.pop(0)
            if note.end is None:
                continue
            self._feed_note(note)

    def _replay(self, notes: list[Note]) -> None:
        """Feed the model's notes as they sounded, in the stream's own encoding."""
        if self.kind == "lengths":
            for note in sorted(notes, key=lambda n: (n.onset, n.pitch)):
                self._feed_note(note)
            return
        events = sorted([(n.onset, 1, n.pitch, n.velocity) for n in notes] + [(n.end, 0, n.pitch, 0) for n in notes])
        for step, is_on, pitch, velocity in events:
            self._feed_event(step, "on" if is_on else "off", pitch, velocity)

    def _feed(self, ids: list[int]) -> None:
        if not ids:
            return
        self.logits = self.decoder.feed(torch.tensor([ids], device=self.decoder.device), last_only=True)
        if self.guard is not None:
            self.guard.feed(ids)

    def _warm_up(self) -> None:
        """A few sampling steps on a copy of the state, so that the first answer does not pay what torch and
        the kernels pay on first use. The engine's generator, guard and state are untouched."""
        saved, generator = self.decoder.snapshot(), torch.Generator(device=self.decoder.device).manual_seed(0)
        logits = self.logits
        for _ in range(self.settings.steps_per_poll):
            ban = self.banned if self.guard is None else self.banned | self.guard.banned()
            logits = self.decoder.step(sample_next(logits, self.sampling, generator, ban))
        self.decoder.restore(saved)
